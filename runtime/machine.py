"""What the CPU is, read from /proc/cpuinfo (Linux) without torch: its model name, and whether it has AVX2, the
instruction set the demo pins its code paths to (study/grid.py)."""
import platform
from pathlib import Path


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo; {} where there is none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """'AMD EPYC (family 25, model 17)', or what platform knows where there is no /proc/cpuinfo."""
    info = cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name} (family {info['cpu family']}, model {info['model']})" if "cpu family" in info else name


def has_avx2() -> bool:
    return "avx2" in cpuinfo().get("flags", "").split()
