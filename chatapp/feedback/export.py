"""Export the feedback as TRL datasets: `python -m chatapp export --format kto|dpo|sft|all --out DIR`.

What one export of format F writes into DIR:
- `F.parquet` (only when there are rows: datasets cannot load a parquet file without any): the rows with
  their images embedded (PNG bytes, `datasets.Image` features). The one
  documented way to load it, ready for TRL:
      datasets.load_dataset("parquet", data_files="DIR/F.parquet", split="train")
  (`load_dataset("json")` does not resolve the JSONL's relative image paths against the file, and
  imagefolder's metadata.jsonl breaks on rows with no image, so parquet is the loadable form.)
- `F.jsonl`: the same rows, one JSON object a line, images as paths `images/<sha256>.png` relative
  to DIR: for reading and diffing.
- `F.provenance.jsonl`: line i says where row i came from (message ids, user id and name, the
  duplicates merged into it). Never part of the training rows.
- `images/<sha256>.png`: every image the rows refer to, copied from the store.
- `export.json`: the manifest (formats, row and image counts, skipped feedback). Its presence marks
  DIR as an export folder; an export refuses to write into a non-empty folder without it.

Invariants:
- Rows come only from `prefs` (the trainer uses the same functions); the files hold exactly TRL's
  columns. Every file is written to a temp name and renamed, so a crash never leaves half a file
  under a final name.
- Importing this module is cheap (no datasets, torch or gradio): the CLI builds its parser from it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from chatapp.core import config
from chatapp.core.clock import now_iso
from chatapp.core.files import atomic_write
from chatapp.feedback.prefs import COLUMNS, FORMATS, image_sha, rows as build_rows

MANIFEST = "export.json"
IMAGES_DIR = "images"
ROW_GROUP_SIZE = 100  # rows per parquet row group (datasets uses 100 for image data too)


class ExportError(ValueError):
    """The export cannot run as asked; the message says why, in one line."""


def features(fmt: str):
    """The `datasets.Features` of one format: conversational messages whose parts all have `type` and
    `text` (None for an image placeholder), and `images` as a list of embedded images."""
    import datasets

    message = {"role": datasets.Value("string"),
               "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})}
    columns = {"images": datasets.List(datasets.Image()), "prompt": datasets.List(message)}
    for name in COLUMNS[fmt][2:]:
        columns[name] = datasets.Value("bool") if name == "label" else datasets.List(message)
    return datasets.Features(columns)


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ExportError(f"{out_dir} is not empty and is not an export folder (it has no {MANIFEST}); "
                          "choose a new or empty folder")


def _copy_image(source: Path, out_dir: Path) -> str:
    """Copy one store image into out_dir/images (once) and return its path relative to out_dir."""
    relative = f"{IMAGES_DIR}/{image_sha(source)}.png"
    target = out_dir / relative
    if not target.exists():
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return relative


def _write_jsonl(path: Path, items: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
    atomic_write(path, write)


def _write_parquet(path: Path, fmt: str, rows: list[dict], out_dir: Path) -> None:
    """Rows (images as paths relative to out_dir) into parquet with the images' bytes embedded,
    written one row group at a time so a large export never holds every image in memory."""
    import datasets
    import pyarrow.parquet as pq

    feats = features(fmt)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, feats.arrow_schema) as writer:
            for start in range(0, len(rows), ROW_GROUP_SIZE):
                chunk = [dict(row, images=[{"bytes": (out_dir / p).read_bytes(), "path": Path(p).name}
                                           for p in row["images"]])
                         for row in rows[start:start + ROW_GROUP_SIZE]]
                table = datasets.Dataset.from_list(chunk, features=feats).data.table
                writer.write_table(table.cast(feats.arrow_schema))
    atomic_write(path, write)


def export(store, fmt: str, out_dir: str | os.PathLike) -> dict:
    """Write one format's files into out_dir (see the module doc) and return its summary:
    format, rows, images (distinct files), the paths written and the skipped feedback by reason."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out_dir = Path(out_dir).resolve()
    check_out_dir(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():  # mark the folder first: an interrupted export can be run again into it
        atomic_write(manifest_path, "{}\n")

    built = build_rows(store, fmt)
    exported = []
    for row in built.rows:
        exported.append(dict(row, images=[_copy_image(Path(p), out_dir) for p in row["images"]]))
    images = sorted({p for row in exported for p in row["images"]})

    jsonl, parquet, provenance = (out_dir / f"{fmt}.jsonl", out_dir / f"{fmt}.parquet",
                                  out_dir / f"{fmt}.provenance.jsonl")
    if exported:
        _write_parquet(parquet, fmt, exported, out_dir)
    else:  # datasets cannot load a parquet file without rows ("corresponds to no data"): write none
        parquet.unlink(missing_ok=True)  # nor leave an earlier export's rows looking current
        parquet = None
    _write_jsonl(jsonl, exported)
    _write_jsonl(provenance, built.provenance)
    summary = {"format": fmt, "rows": len(exported), "images": len(images), "parquet": parquet and str(parquet),
               "jsonl": str(jsonl), "provenance": str(provenance), "skipped": dict(sorted(built.skipped.items())),
               "labels": ({"up": sum(r["label"] for r in exported), "down": sum(not r["label"] for r in exported)}
                          if fmt == "kto" else None),
               "exported_at": now_iso("seconds"),
               "store": str(store.data_dir)}

    manifest = json.loads(manifest_path.read_text())
    manifest.setdefault("load", 'datasets.load_dataset("parquet", data_files="<dir>/<format>.parquet", '
                                'split="train")')
    manifest.setdefault("formats", {})[fmt] = {k: v for k, v in summary.items()
                                               if k not in ("parquet", "jsonl", "provenance") and v is not None}
    atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- command line

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `export` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "export", help="write the collected feedback as TRL datasets (KTO, DPO, SFT)",
        description="Write the collected feedback as TRL training data. For each format: FORMAT.parquet (images "
                    "embedded; load it with datasets.load_dataset(\"parquet\", data_files=\"OUT/FORMAT.parquet\", "
                    "split=\"train\")), FORMAT.jsonl (images as relative paths into OUT/images/), "
                    "FORMAT.provenance.jsonl (who voted for each row) and export.json.",
        epilog="kto: every current thumb (up = desirable). dpo: preferred regenerated answers against their siblings, "
               "and side-by-side comparisons decided a or b. sft: every liked answer.")
    parser.add_argument("--format", choices=[*FORMATS, "all"], default="all",
                        help="which dataset to write (default: all three)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: new, empty, or an earlier export (its files are replaced)")
    parser.add_argument("--data-dir", help="the app's data folder with the feedback database "
                                           f"(default: {config.DATA_DIR_HELP})")
    return parser


def run(args) -> int:
    """The `export` command: one summary line per format on stdout; a user mistake exits 2 with one line."""
    from chatapp.feedback.store import DB_NAME, Store

    try:
        data_dir = config.data_dir(args.data_dir)
        if not (data_dir / DB_NAME).is_file():
            raise ExportError(f"no feedback database at {data_dir / DB_NAME} (set --data-dir or $CHATAPP_DATA_DIR)")
        out_dir = Path(args.out).resolve()
        check_out_dir(out_dir)
        store = Store(data_dir)
        try:
            for fmt in FORMATS if args.format == "all" else [args.format]:
                s = export(store, fmt, out_dir)
                skipped = sum(s["skipped"].values())
                where = s["parquet"] or "no parquet written (no rows)"
                print(f"{fmt}: {s['rows']} rows, {s['images']} images -> {where}"
                      + (f" ({skipped} skipped: {', '.join(f'{n} {why}' for why, n in s['skipped'].items())})"
                         if skipped else ""))
        finally:
            store.close()
    except (ExportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
