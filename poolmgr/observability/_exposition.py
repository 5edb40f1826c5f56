"""The Prometheus text format (0.0.4), written directly: prometheus_client's generate_latest spends ~25 µs on
each sample (label-name validation and escaping per sample), which at 1,000 pools is most of a second. Label
names here are fixed and valid, so a sample is one f-string. The output is what generate_latest writes for the
same families, byte for byte (tests/observability/test_metrics_scale.py checks it): labels sorted by name,
values as `floatToGoString` writes them, HELP and label values escaped the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

_WRITTEN: dict[float, str] = {}  # most values repeat (0, 1, slot counts): written once


def fmt(value: float) -> str:
    """A sample value: 1.0, 0.5, 1e+07, +Inf (Go's formatting, as Prometheus clients write it)."""
    text = _WRITTEN.get(value)
    if text is None:
        if len(_WRITTEN) > 4096:
            _WRITTEN.clear()
        text = _WRITTEN[value] = str(floatToGoString(value))  # type: ignore[no-untyped-call]
    return text


def esc(value: str) -> str:
    """A label value, escaped as the text format wants it."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def header(name: str, kind: str, doc: str) -> str:
    """# HELP and # TYPE of a family (`name` as exposed: a counter's with its _total)."""
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def family(out: list[str], name: str, kind: str, doc: str, lines: Iterable[str]) -> None:
    out.append(header(name, kind, doc))
    out.extend(lines)


def pool_label(pool_id: str) -> str:
    return f'pool_id="{esc(pool_id)}"'


def parse(text: str) -> Iterator[Metric]:
    """The families of an exposition, for a prometheus_client collector (which re-writes them identically)."""
    yield from text_string_to_metric_families(text)


__all__ = ["esc", "family", "fmt", "header", "parse", "pool_label"]
