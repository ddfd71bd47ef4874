"""Formatting shared by the command groups and load tests: argument lists, milliseconds, MiB, spreads over repeats,
markdown tables, progress bars."""

from __future__ import annotations

import statistics


def positive_ints(text: str, what: str) -> list[int]:
    """``"16,64,256"`` → ``[16, 64, 256]``; a clear error naming the ``--what`` option otherwise."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated whole numbers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"--{what} needs positive numbers, got {text!r}")
    return vals


def ms(seconds: float | None, digits: int = 1, width: int = 0) -> str:
    """Seconds as milliseconds (``—`` when unknown), right-aligned to ``width``."""
    return ("—" if seconds is None else f"{seconds * 1e3:.{digits}f}").rjust(width)


def number(x: float | None, digits: int = 1) -> str:
    """A figure, or ``—`` where it is not known (e.g. tokens/s of an answer that stopped after one token)."""
    return "—" if x is None else f"{x:.{digits}f}"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f}"


def spread(values: list[float], digits: int = 1) -> str:
    """Repeated measurements as ``median [min–max]``."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def markdown_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, cells[1:])])


def progress(total: int, unit: str = "step"):
    """A tqdm bar (on stderr, gone when done) and ``step(label)`` that advances it by one."""
    from tqdm import tqdm

    bar = tqdm(total=total, leave=False, unit=unit)

    def step(label: str) -> None:
        bar.set_description(label)
        bar.update(1)

    return bar, step
