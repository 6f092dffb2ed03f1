"""Google Landmarks Dataset v2 (Weyand et al., CVPR 2020): metadata CSVs and image layout.

Files (https://github.com/cvdfoundation/google-landmark, dataset version 2.1)::

    train.csv                    id,url,landmark_id
    train_clean.csv              landmark_id,images          (images: space-separated train ids)
    index.csv                    id
    test.csv                     id
    retrieval_solution_v2.1.csv  id,images,Usage             (images: space-separated index ids,
                                                              or None; Usage: Public/Private/Ignored)

Images extract to ``<root>/<split>/<a>/<b>/<c>/<id>.jpg`` where ``a``, ``b``, ``c`` are the
first three characters of the id. Columns are found by header name, so extra columns (and
another column order) are accepted. Every reader streams its file with the ``csv`` module and
reports a bad file as a one-line ``ValueError`` of the form ``<file>: line <n>: <problem>``,
``n`` being the 1-based line of the file (the header is line 1).

The ``landmark_id,images`` schema of ``train_clean.csv`` is also the schema of the project's
``cleaned_subsets/*.csv``; `write_train_clean` writes it.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.dataset import ImageList, RetrievalDataset

SPLITS = ("train", "index", "test")
TAR_COUNTS = {"train": 500, "index": 100, "test": 20}  # images_000.tar ... per split
USAGES = ("Public", "Private", "Ignored")
NO_IMAGES = "None"  # the `images` value of solution rows without relevant images

# train_clean rows list up to thousands of ids in one field; the csv default limit is 128 KiB.
_FIELD_SIZE_LIMIT = 1 << 28
_BAD_ID_CHAR = re.compile(r"[\s/\\]")  # whitespace or a path separator


class _Rows:
    """Data rows of a CSV file with a checked header; ``line`` is the current 1-based line."""

    def __init__(self, path: Path, reader: Any, columns: dict[str, int]):
        self.path = path
        self._reader = reader
        self.columns = columns
        self.line = 1
        self._width = max(columns.values()) + 1

    def error(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: line {self.line}: {what}")

    def __iter__(self) -> Iterator[list[str]]:
        reader = self._reader
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                self.line = reader.line_num
                raise self.error(f"malformed CSV ({_one_line(str(err))})") from None
            except UnicodeDecodeError as err:
                # decoding runs ahead in chunks, so only a lower bound on the line is known
                where = f"{self.path}: after line {self.line}"
                raise ValueError(f"{where}: not UTF-8 text ({err.reason})") from None
            self.line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) < self._width:
                raise self.error(f"expected at least {self._width} fields, got {len(row)}")
            yield row


@contextmanager
def _open_rows(csv_path: str | os.PathLike, required: Sequence[str]) -> Iterator[_Rows]:
    path = Path(csv_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: GLDv2 CSV file not found")
    if csv.field_size_limit() < _FIELD_SIZE_LIMIT:
        csv.field_size_limit(_FIELD_SIZE_LIMIT)
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise ValueError(f"{path}: line 1: malformed CSV header ({_one_line(str(err))})") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: line 1: not UTF-8 text ({err.reason})") from None
        if header is None:
            raise ValueError(f"{path}: line 1: empty file, expected a header with {', '.join(required)}")
        names = [h.strip() for h in header]
        columns: dict[str, int] = {}
        for name in required:
            if name not in names:
                raise ValueError(f"{path}: line 1: header has no {name!r} column "
                                 f"(expected {','.join(required)}, got {_one_line(','.join(names))[:200]!r})")
            columns[name] = names.index(name)
        yield _Rows(path, reader, columns)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_id(rows: _Rows, value: str, what: str = "id") -> str:
    image_id = value.strip()
    if not image_id:
        raise rows.error(f"empty {what}")
    if _BAD_ID_CHAR.search(image_id):
        raise rows.error(f"bad {what} {image_id!r} (whitespace or path separator)")
    return image_id


def _parse_int(rows: _Rows, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise rows.error(f"{what} must be an integer, got {value!r}") from None


def gldv2_image_path(root: str | os.PathLike, split: str, image_id: str) -> Path:
    """``<root>/<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``, the layout the GLDv2 tars extract to."""
    if len(image_id) < 3 or _BAD_ID_CHAR.search(image_id):
        raise ValueError(f"GLDv2 image id {image_id!r} must have 3+ characters and no separators or spaces")
    return Path(root) / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def read_train(csv_path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``train.csv`` (``id,url,landmark_id``) → (image ids, landmark ids as int64), in file order."""
    ids: list[str] = []
    labels: list[int] = []
    with _open_rows(csv_path, ("id", "landmark_id")) as rows:
        c_id, c_lm = rows.columns["id"], rows.columns["landmark_id"]
        for row in rows:
            ids.append(_check_id(rows, row[c_id]))
            labels.append(_parse_int(rows, row[c_lm], "landmark_id"))
    return ids, np.asarray(labels, dtype=np.int64)


def read_train_clean(csv_path: str | os.PathLike) -> dict[int, list[str]]:
    """``train_clean.csv`` / ``cleaned_subsets/*.csv`` (``landmark_id,images``) → landmark → train ids."""
    out: dict[int, list[str]] = {}
    first_line: dict[int, int] = {}
    with _open_rows(csv_path, ("landmark_id", "images")) as rows:
        c_lm, c_im = rows.columns["landmark_id"], rows.columns["images"]
        for row in rows:
            landmark = _parse_int(rows, row[c_lm], "landmark_id")
            if landmark in out:
                raise rows.error(f"landmark_id {landmark} repeated (first on line {first_line[landmark]})")
            images = row[c_im].split()
            if not images:
                raise rows.error(f"landmark_id {landmark} has no images")
            out[landmark] = [_check_id(rows, image_id, "image id") for image_id in images]
            first_line[landmark] = rows.line
    return out


def read_ids(csv_path: str | os.PathLike) -> list[str]:
    """``index.csv`` / ``test.csv`` (an ``id`` column, others ignored) → unique ids in file order."""
    ids: list[str] = []
    seen: dict[str, int] = {}
    with _open_rows(csv_path, ("id",)) as rows:
        c_id = rows.columns["id"]
        for row in rows:
            image_id = _check_id(rows, row[c_id])
            if image_id in seen:
                raise rows.error(f"id {image_id!r} repeated (first on line {seen[image_id]})")
            seen[image_id] = rows.line
            ids.append(image_id)
    return ids


def read_retrieval_solution(csv_path: str | os.PathLike, usage: Iterable[str] | str = ("Public", "Private"),
                            *, query_ids: Collection[str] | None = None,
                            index_ids: Collection[str] | None = None) -> dict[str, list[str]]:
    """``retrieval_solution_v2.1.csv`` (``id,images,Usage``) → test id → relevant index ids.

    Rows whose ``images`` is ``None`` (or empty) or whose ``Usage`` is not in ``usage`` are left
    out. ``query_ids`` / ``index_ids``, when given, are the known test / index ids: a row naming
    an id outside them is an error. Repeated index ids within a row are kept once.
    """
    wanted = (usage,) if isinstance(usage, str) else tuple(usage)
    unknown = [u for u in wanted if u not in USAGES]
    if unknown:
        raise ValueError(f"usage must be among {USAGES}, got {unknown}")
    out: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    with _open_rows(csv_path, ("id", "images", "Usage")) as rows:
        c_id, c_im, c_us = rows.columns["id"], rows.columns["images"], rows.columns["Usage"]
        for row in rows:
            query = _check_id(rows, row[c_id])
            if query in seen:
                raise rows.error(f"id {query!r} repeated (first on line {seen[query]})")
            seen[query] = rows.line
            tag = row[c_us].strip()
            if tag not in USAGES:
                raise rows.error(f"Usage must be one of {', '.join(USAGES)}, got {tag!r}")
            if query_ids is not None and query not in query_ids:
                raise rows.error(f"query id {query!r} is not in the test list")
            field = row[c_im].strip()
            if tag not in wanted or field in ("", NO_IMAGES):
                continue
            relevant = [_check_id(rows, image_id, "index image id") for image_id in field.split()]
            if index_ids is not None:
                for image_id in relevant:
                    if image_id not in index_ids:
                        raise rows.error(f"index image id {image_id!r} is not in the index list")
            out[query] = list(dict.fromkeys(relevant))
    return out


def write_train_clean(path: str | os.PathLike, mapping: Mapping[int, Sequence[str]]) -> None:
    """Write ``landmark_id,images`` (the ``train_clean.csv`` schema) atomically, rows in mapping order."""
    path = Path(path)
    rows: list[tuple[int, str]] = []
    for landmark, images in mapping.items():
        try:
            lm = int(landmark)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: landmark_id must be an integer, got {landmark!r}") from None
        if isinstance(images, str):
            raise ValueError(f"{path}: landmark_id {lm}: images must be a sequence of ids, not a string")
        ids = [str(i) for i in images]
        if not ids:
            raise ValueError(f"{path}: landmark_id {lm} has no images")
        for image_id in ids:
            if not image_id or _BAD_ID_CHAR.search(image_id) or "," in image_id:
                raise ValueError(f"{path}: landmark_id {lm}: bad image id {image_id!r}")
        rows.append((lm, " ".join(ids)))
    if len({lm for lm, _ in rows}) != len(rows):
        raise ValueError(f"{path}: landmark ids repeat after conversion to int")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("landmark_id", "images"))
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_gldv2_retrieval(root: str | os.PathLike, solution_csv: str | os.PathLike | None = None, *,
                         usage: Iterable[str] | str = ("Public", "Private")) -> RetrievalDataset:
    """The GLDv2 retrieval benchmark as a `RetrievalDataset`.

    Reads ``<root>/metadata/{index,test}.csv`` and the solution (default
    ``<root>/metadata/retrieval_solution_v2.1.csv``). Queries are the test ids that have relevant
    images in the selected ``usage`` subsets, in ``test.csv`` order; the database is every index
    id in ``index.csv`` order. ``gnd[i] = {"easy": [db rows of the relevant ids], "hard": [],
    "junk": []}``. Images are ``<root>/test/...`` and ``<root>/index/...`` (see `gldv2_image_path`).
    """
    root = Path(root)
    meta = root / "metadata"
    solution_path = Path(solution_csv) if solution_csv is not None else meta / "retrieval_solution_v2.1.csv"
    index_ids = read_ids(meta / "index.csv")
    test_ids = read_ids(meta / "test.csv")
    db_row = {image_id: j for j, image_id in enumerate(index_ids)}
    solution = read_retrieval_solution(solution_path, usage, query_ids=set(test_ids), index_ids=db_row)
    query_ids = [q for q in test_ids if q in solution]
    gnd = [{"easy": [db_row[d] for d in solution[q]], "hard": [], "junk": []} for q in query_ids]
    queries = ImageList(query_ids, [gldv2_image_path(root, "test", q) for q in query_ids])
    db = ImageList(index_ids, [gldv2_image_path(root, "index", d) for d in index_ids])
    return RetrievalDataset("gldv2", queries, db, gnd, protocol="gldv2")
