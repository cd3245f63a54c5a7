"""What a teacher run did: counts, rejects by reason, timings and the finished cache's size."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def per_input(config) -> int:
    """Examples (or rejects) per input record: n in generate mode, else 1."""
    return config.n if config.mode == "generate" else 1


@dataclass
class Summary:
    examples: int = 0  # examples written by this run
    positions: int = 0  # trained positions written by this run
    tokens: int = 0  # tokens the teacher processed (prompt + generated)
    resumed: int = 0  # inputs an earlier run had already finished
    inputs: int = 0  # records of this worker's slice seen
    per_input: int = 1  # examples (or rejects) per input record: n in generate mode
    truncated: int = 0
    rejects: Counter = field(default_factory=Counter)  # reason code -> count
    wall_s: float = 0.0
    teacher_s: float = 0.0
    cache_bytes: int = 0
    cache_positions: int = 0  # all positions in the finished cache (including resumed ones)
    out: str = ""
    teacher: str = ""  # engine and dtype used, and why

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["rejects"] = dict(self.rejects)
        return d

    def record_cache_size(self, manifest: dict) -> None:
        """The finished cache's bytes and positions, as its manifest's `counts` records them."""
        counts = manifest.get("counts") or {}
        self.cache_bytes, self.cache_positions = int(counts.get("bytes", 0)), int(counts.get("positions", 0))

    def report(self) -> str:
        lines = [
            f"cache   {self.out}",
            *([f"teacher {self.teacher}"] if self.teacher else []),
            f"inputs  {self.inputs}{f' x n={self.per_input}' if self.per_input > 1 else ''} "
            f"({self.examples} written, {sum(self.rejects.values())} rejected, "
            f"{self.resumed} done by an earlier run, {self.truncated} truncated)",
            f"positions {self.positions} written; tokens {self.tokens}",
        ]
        for reason, count in sorted(self.rejects.items(), key=lambda kv: -kv[1]):
            lines.append(f"  reject {reason}: {count}")
        if self.cache_positions:
            lines.append(
                f"bytes/position {self.cache_bytes / self.cache_positions:.1f} "
                f"({self.cache_bytes / 2**20:.1f} MiB for {self.cache_positions} positions)"
            )
        rate = self.tokens / self.wall_s if self.wall_s else 0.0
        lines.append(f"wall {self.wall_s:.1f}s (teacher {self.teacher_s:.1f}s); {rate:.0f} tokens/s overall")
        return "\n".join(lines)
