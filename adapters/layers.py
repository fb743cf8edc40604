"""Which layers a method trains: one syntax for --layers everywhere, and the check against the model's depth."""


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'3' -> the last 3 layers; '0-2', '25-27' -> inclusive ranges; '0,5,9' -> those layers; 'all'.

    Items of a comma list may be ranges ('0-2,9'). Sorted, without repeats. A layer the model does not
    have is an error that names the model's depth.
    """
    spec = str(spec).strip()
    if spec == "all":
        return list(range(num_layers))
    if spec.isdigit():
        n = int(spec)
        if not 1 <= n <= num_layers:
            raise ValueError(f"--layers {spec}: cannot take the last {n} layers: the model has {num_layers} layers "
                             f"(0-{num_layers - 1})")
        return list(range(num_layers - n, num_layers))
    layers = set()
    for item in spec.split(","):
        lo, dash, hi = item.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"--layers {spec!r}: expected 'N' (the last N layers), 'A-B', 'A,B,C' or 'all'")
        lo, hi = int(lo), int(hi) if dash else int(lo)
        if hi < lo:
            raise ValueError(f"--layers {spec!r}: range {lo}-{hi} is empty; write it low-high")
        layers.update(range(lo, hi + 1))
    check_layers(sorted(layers), num_layers)
    return sorted(layers)


def check_layers(layers: list[int], num_layers: int):
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        which = f"layer {bad[0]} does not" if len(bad) == 1 else f"layers {', '.join(map(str, bad))} do not"
        raise ValueError(f"{which} exist: the model has {num_layers} layers (0-{num_layers - 1})")
