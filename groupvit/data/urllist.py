"""Read and validate caption url lists (tsv, csv or parquet; a file or a folder of files).

Column names come from params, so both CC3M's `caption<TAB>url` and CC12M's `url<TAB>caption` layouts work: the
files need a header row naming the columns (the official CC3M tsv has none; add one, see README "Caption data").
The result is one normalised table with exactly the columns `url` and `caption`, in input order, which the download
stage hands to img2dataset as parquet. Row order fixes img2dataset's sample keys, so it is never changed here.
"""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from groupvit.errors import DataError

FORMATS = ("tsv", "csv", "parquet")
log = logging.getLogger(__name__)


def infer_format(path: str | Path) -> str:
    """The url list format from the file suffix (`.tsv`, `.csv`, `.parquet`, optionally `.gz` for the text ones)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = suffixes[-1].lstrip(".") if suffixes else ""
    if fmt not in FORMATS:
        raise DataError(f"{path}: cannot infer the url list format from the suffix; set download.input_format to one "
                        f"of {', '.join(FORMATS)}")
    return fmt


def _files(path: Path, fmt: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and infer_format_or_none(p) == fmt)
        if not files:
            raise DataError(f"{path}: folder holds no .{fmt} url list files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: url list not found")
    return [path]


def infer_format_or_none(path: Path) -> str | None:
    try:
        return infer_format(path)
    except DataError:
        return None


def _read_one(path: Path, fmt: str, columns: list[str]) -> pa.Table:
    try:
        if fmt == "parquet":
            found = pq.read_schema(path).names
        else:
            delimiter = "\t" if fmt == "tsv" else ","
            # Captions contain quotes and commas; tsv files (CC3M/CC12M) are not quoted.
            # Rows with the wrong number of fields (stray tabs in web captions) are skipped and counted.
            parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False if fmt == "tsv" else '"',
                                       newlines_in_values=False, invalid_row_handler=_skip_row)
            convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=False)
            reader = pacsv.open_csv(path, parse_options=parse, convert_options=convert)
            found = reader.schema.names
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable {fmt} url list ({e})") from None
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (columns found: {', '.join(map(repr, found))}); set "
                        f"download.url_col / download.caption_col to the names in the file")
    try:
        table = pq.read_table(path, columns=columns) if fmt == "parquet" else reader.read_all().select(columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable {fmt} url list ({e})") from None
    if _SKIPPED_ROWS[0]:
        log.warning("%s: skipped %d malformed rows (wrong number of fields)", path, _SKIPPED_ROWS[0])
        _SKIPPED_ROWS[0] = 0
    return table


_SKIPPED_ROWS = [0]


def _skip_row(row: object) -> str:
    _SKIPPED_ROWS[0] += 1
    return "skip"


def read_url_list(path: str | Path, input_format: str = "", url_col: str = "url",
                  caption_col: str = "caption") -> pa.Table:
    """Read a url list into a table with string columns `url` and `caption`, in input order.

    Args:
        path: a file, or a folder whose files of that format are read in name order.
        input_format: `tsv`, `csv` or `parquet`; empty = infer from the suffix.
        url_col: name of the url column in the file.
        caption_col: name of the caption column in the file.

    Raises:
        DataError: the file is missing or unreadable, a column is missing (the message lists the columns found), or
            the list holds no rows.
    """
    path = Path(path)
    fmt = input_format or (infer_format(path) if not path.is_dir() else "")
    if not fmt:
        raise DataError(f"{path}: a folder url list needs download.input_format ({', '.join(FORMATS)})")
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown input_format {fmt!r} (expected one of {', '.join(FORMATS)})")
    tables = [_read_one(f, fmt, [url_col, caption_col]) for f in _files(path, fmt)]
    table = pa.concat_tables(tables)
    table = pa.table({"url": table.column(url_col).cast(pa.string()),
                      "caption": table.column(caption_col).cast(pa.string()).fill_null("")})
    if table.num_rows == 0:
        raise DataError(f"{path}: url list is empty (no rows after the header)")
    nulls = table.column("url").null_count
    if nulls:
        raise DataError(f"{path}: column {url_col!r} has {nulls} empty urls")
    return table


def loopback_address(urls: pa.ChunkedArray | list[str], where: str) -> tuple[str, int]:
    """The single `(host, port)` every url points at, which must be a loopback address (for the local image server).

    Raises:
        DataError: urls point at several hosts, at a non-loopback host, or have no explicit port.
    """
    hosts = {}
    for url in (urls.to_pylist() if hasattr(urls, "to_pylist") else urls):
        parts = urlsplit(url)
        hosts[(parts.hostname, parts.port)] = url
        if len(hosts) > 1:
            break
    if len(hosts) != 1:
        found = ", ".join(f"{h}:{p}" for h, p in hosts)
        raise DataError(f"{where}: download.serve_dir is set, so every url must point at one loopback server; found "
                        f"{found}. Set download.serve_dir: '' for internet url lists")
    (host, port), url = next(iter(hosts.items()))
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback or port is None:
        raise DataError(f"{where}: download.serve_dir is set, so urls must be http://<loopback host>:<port>/...; "
                        f"found {url!r}. Set download.serve_dir: '' for internet url lists")
    return host, port
