"""The ground floor: what every command needs of the process and the file system, knowing nothing of ChatGLM or
the study. It imports nothing of the project's own.

    files.py       atomic JSON / text / directory writes, JSON lines, digests, one-line OS errors; InputError and
                   the checked JSON / UTF-8 reading every reader of a user's file starts from
    flags.py       argparse types that check a number when it is parsed; typed settings from the flags
    precision.py   the one precision flag (--precision bf16|fp16|fp32) and its one default rule
    process.py     the torchrun set-up, collectives on Python objects, RNG state, peak memory
    checkpoint.py  training-state checkpoints that resume bit for bit
"""
