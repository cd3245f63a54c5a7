"""The cache writer's calls, run in one background thread so writing overlaps the teacher's work."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


class WriterThread:
    """Every call on the cache writer, run in one background thread in submission order, so encoding and
    compressing batch i overlaps the teacher's work on batch i + 1 (vLLM's engine runs in its own process;
    numpy, zstd and Parquet release the GIL). At most one written batch waits; failures surface here."""

    def __init__(self, writer):
        self.writer = writer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer")
        self.futures: list = []
        self.last_batch = None

    def _submit(self, fn, *args):
        future = self.pool.submit(fn, *args)
        self.futures.append(future)
        while self.futures and self.futures[0].done():
            self.futures.pop(0).result()  # raises a failed write here, in the main thread
        return future

    def reject(self, record_id: str, reason: str, source: str) -> None:
        self._submit(self.writer.reject, record_id, reason, source)

    def write_batch(self, examples: list) -> None:
        if self.last_batch is not None:
            self.last_batch.result()
        self.last_batch = self._submit(self._write_all, examples)

    def _write_all(self, examples: list) -> None:
        for example in examples:
            self.writer.write(example)

    def drain(self) -> None:
        self.pool.shutdown(wait=True)
        futures, self.futures = self.futures, []
        for future in futures:
            future.result()
