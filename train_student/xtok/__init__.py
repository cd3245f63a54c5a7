"""A student with another tokenizer than the teacher's (docs/CROSS_TOKENIZER.md): the wing of the trainer
that aligns the student's tokens to the teacher's cached ones.

    check.py      check_student_tokenizer: off (the teacher's tokenizer) or an alignment method
    template.py   the student's chat template, resolved and checked against the cached conversations
    vocab_map.py  teacher id -> student id of tokens with the same bytes (built once, cached)
    align.py      Aligner / AlignedStream inputs: teacher rows mapped onto the student's positions
    loss.py       xtok_loss: KD on the aligned rows, ULD on the others

The trainer (train_student/train.py) imports these modules; nothing here imports the trainer.
"""
