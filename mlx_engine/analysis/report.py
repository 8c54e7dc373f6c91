"""An analysis folder: a new timestamped folder with the figures, report.md, report.html and manifest.json.

The folder is new for every run (`demo.layout.new_run_folder`: mkdir without exist_ok,
a -N suffix within one second), so nothing is ever overwritten. The manifest lists every
file written, the figures with their data files, the model and the arguments.
"""

from __future__ import annotations

import html
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import __version__
from ..demo.layout import new_run_folder
from .figures import FigureFiles

Table = tuple[str, list[str], list[list[Any]]]  # caption, column names, rows


@dataclass
class Section:
    """One heading of the report: paragraphs, tables and figures."""

    heading: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureFiles] = field(default_factory=list)


def analysis_folder(out: Path) -> Path:
    """A new folder `<out>/<YYYYmmdd-HHMMSS>[-N]`; an existing one is never reused (the manifest says its kind)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder.")
    return new_run_folder(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "\\n")


def markdown(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    lines = [f"# {title}", ""] + [p + "\n" for p in intro]
    for s in sections:
        lines += [f"## {s.heading}", ""] + [p + "\n" for p in s.text]
        for caption, columns, rows in s.tables:
            lines += [f"**{caption}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_md_escape(_cell(v)) for v in row) + " |" for row in rows]
            lines.append("")
        for f in s.figures:
            links = ", ".join(f"[{kind}]({name})" for kind, name in f.files.items() if kind != "png")
            lines += [f"![{f.title}]({f.files['png']})", "", f"*{f.title}* ({links})", ""]
    return "\n".join(lines)


def html_page(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}img{max-width:100%}</style></head><body>",
             f"<h1>{e(title)}</h1>"] + [f"<p>{e(p)}</p>" for p in intro]
    for s in sections:
        parts += [f"<h2>{e(s.heading)}</h2>"] + [f"<p>{e(p)}</p>" for p in s.text]
        for caption, columns, rows in s.tables:
            parts.append(f"<table><caption>{e(caption)}</caption><tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(_cell(v))}</td>" for v in row) + "</tr>" for row in rows]
            parts.append("</table>")
        for f in s.figures:
            links = " ".join(f"<a href='{e(name)}'>{e(kind)}</a>" for kind, name in f.files.items() if kind != "png")
            parts.append(f"<figure><img src='{e(f.files['png'])}' alt='{e(f.title)}'><figcaption>{e(f.title)} ({links})</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    folder: Path, kind: str, title: str, intro: Sequence[str], sections: Sequence[Section], *, model: str,
    arguments: dict[str, Any], extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write report.md, report.html and manifest.json into `folder` (new files only); return the manifest."""
    for name in ("report.md", "report.html", "manifest.json"):
        if (folder / name).exists():
            raise FileExistsError(f"{folder / name} exists; an analysis folder is written once.")
    (folder / "report.md").write_text(markdown(title, intro, sections), encoding="utf-8")
    (folder / "report.html").write_text(html_page(title, intro, sections), encoding="utf-8")
    manifest = {
        "kind": kind,
        "title": title,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mlx_engine_version": __version__,
        "python": platform.python_version(),
        "model": model,
        "arguments": arguments,
        "figures": [f.to_json() for s in sections for f in s.figures],
        "sections": [s.heading for s in sections],
        **(extra or {}),
    }
    manifest["files"] = sorted([p.name for p in folder.iterdir()] + ["manifest.json"])
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest
