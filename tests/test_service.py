"""The search service: its core (`retrieval.service`) and its HTTP API through FastAPI's test client."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from retrieval.data import load_dataset
from retrieval.extract import extract_features
from retrieval.features import read_features
from retrieval.models import create_model
from retrieval.rerank import rerank_search
from retrieval.service import (
    ImageTable,
    Limits,
    RequestError,
    dataset_table,
    decode_image,
    image_table,
    load_service,
    parse_bbx,
    parse_k,
)
from tests.conftest import write_jpeg

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from retrieval.api import create_app  # noqa: E402

METHODS = ["aqe", "adba+aqe", "diffusion", "kreciprocal"]
LIMITS = Limits(max_bytes=300_000, max_pixels=4_000_000, max_k=50, max_batch=4)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The tiny built-in benchmark, a random-weight net and the database's features at 64 px."""
    import torch

    root = tmp_path_factory.mktemp("serve")
    ds = load_dataset("synthetic", root / "data", "tiny", 0)
    torch.manual_seed(0)
    net = create_model(architecture="test_efficientnet", pretrained=None, pooling="gem")
    db_h5 = extract_features(net, ds.db, root / "db_ss.h5", image_size=64, progress=False)
    q_h5 = extract_features(net, ds.queries, root / "query_ss.h5", image_size=64, progress=False)
    service = load_service(net, db_h5, table=dataset_table(ds), methods=METHODS,
                           params={"qe_n": 2, "dba_n": 2, "alpha": 3.0, "diffusion_kd": 5, "diffusion_kq": 3},
                           limits=LIMITS)
    return ds, service, db_h5, q_h5


@pytest.fixture(scope="module")
def client(bench):
    return TestClient(create_app(bench[1]))


def _jpeg_bytes(path) -> bytes:
    return path.read_bytes()


def _upload(client, data: bytes, name: str = "q.jpg", **form):
    return client.post("/search", files={"image": (name, data, "image/jpeg")}, data=form)


# ---------------------------------------------------------------- search


def test_upload_of_an_indexed_image_finds_itself_first_with_its_landmark(bench, client):
    ds, service, _, _ = bench
    j = next(i for i, image_id in enumerate(ds.db.ids) if image_id in ds.labels)
    r = _upload(client, _jpeg_bytes(ds.db.paths[j]), k="5")
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 5
    top = body["results"][0]
    assert top["id"] == ds.db.ids[j]
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert top["landmark_id"] == ds.labels[ds.db.ids[j]]
    assert set(body["timing_ms"]) == {"embed", "search", "rerank", "queue"}
    assert body["query"]["width"] == Image.open(ds.db.paths[j]).width
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_by_id_equals_the_index_row_search(bench, client):
    ds, service, db_h5, _ = bench
    ids, feats, _ = read_features(db_h5)
    r = client.post("/search", json={"id": ids[3], "k": 7})
    assert r.status_code == 200, r.text
    got = [h["id"] for h in r.json()["results"]]
    order = np.argsort(-(feats @ feats[3]), kind="stable")[:7]
    assert got[0] == ids[3]
    assert set(got) == {ids[i] for i in order}


def test_upload_with_the_query_box_gives_the_extracted_query_descriptor(bench):
    """A box crops before resizing, exactly as extraction of revisitop queries does."""
    ds, service, _, q_h5 = bench
    q_ids, q_feats, _ = read_features(q_h5)
    img = decode_image(ds.queries.paths[0].read_bytes())
    with_box = service.embed([(img, ds.queries.bbx(0))])[0]
    without = service.embed([(img, None)])[0]
    assert q_ids[0] == ds.queries.ids[0]
    np.testing.assert_allclose(with_box, q_feats[0], atol=1e-5)
    assert float(without @ q_feats[0]) < 1 - 1e-4


def test_batch_returns_one_list_per_image_and_boxes_apply(bench, client):
    ds, service, _, _ = bench
    files = [("images", (f"{i}.jpg", _jpeg_bytes(ds.queries.paths[i]), "image/jpeg")) for i in range(3)]
    box = ",".join(str(round(v)) for v in ds.queries.bbx(1))
    r = client.post("/search/batch", files=files, data={"bbx": ["", box, ""], "k": "4"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [len(x["results"]) for x in res] == [4, 4, 4]
    assert res[0]["query"]["bbx"] is None and res[1]["query"]["bbx"] == [float(v) for v in box.split(",")]
    single = _upload(client, _jpeg_bytes(ds.queries.paths[1]), k="4", bbx=box).json()
    assert [h["id"] for h in single["results"]] == [h["id"] for h in res[1]["results"]]
    by_id = client.post("/search/batch", json={"ids": ds.db.ids[:2], "k": 3}).json()["results"]
    assert [x["results"][0]["id"] for x in by_id] == ds.db.ids[:2]


@pytest.mark.parametrize("method", METHODS)
def test_rerank_equals_the_offline_chain(bench, client, method):
    ds, service, db_h5, q_h5 = bench
    ids, feats, _ = read_features(db_h5)
    _, q_feats, _ = read_features(q_h5)
    scores, idx = rerank_search(method, q_feats[:1], feats, 6, context=service._context)
    img = decode_image(ds.queries.paths[0].read_bytes())
    results, timing = service.search_images([(img, ds.queries.bbx(0))], 6, method)
    assert [h["id"] for h in results[0]] == [ids[j] for j in idx[0]]
    assert timing["rerank"] > 0
    box = ",".join(map(str, ds.queries.bbx(0)))
    r = _upload(client, _jpeg_bytes(ds.queries.paths[0]), k="6", rerank=method, bbx=box)
    assert [h["id"] for h in r.json()["results"]] == [ids[j] for j in idx[0]]


# ---------------------------------------------------------------- pages, thumbnails, info


def test_page_health_info_and_thumbnails(bench, client):
    ds, service, _, _ = bench
    page = client.get("/")
    assert page.status_code == 200 and "/search/batch" in page.text
    assert client.get("/health").json() == {"status": "ok", "index_size": len(ds.db)}
    info = client.get("/info").json()
    assert info["index"]["size"] == len(ds.db) and info["index"]["dim"] == service.feats.shape[1]
    assert info["rerank"] == ["none", *METHODS]
    assert info["embedding"]["image_size"] == 64
    assert info["images"]["with_file"] == len(ds.db)
    thumb = client.get(f"/thumb/{ds.db.ids[0]}", params={"size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64


# ---------------------------------------------------------------- bad input: 4xx JSON, and the server goes on


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_requests(bench):
    ds = bench[0]
    jpeg = ds.db.paths[0].read_bytes()
    up = lambda data, **form: {"files": {"image": ("x.jpg", data, "image/jpeg")}, "data": form}  # noqa: E731
    return {
        "not an image": (up(b"hello, this is text"), 400, "not an image"),
        "zero bytes": (up(b""), 400, "empty upload"),
        "truncated": (up(jpeg[: len(jpeg) // 2]), 400, "truncated"),
        "too many bytes": (up(_noise_png(400)), 413, "over the limit"),
        "too many pixels": (up(_png((5000, 5000), "1")), 413, "pixels"),
        "decompression bomb": (up(_png((30000, 30000), "1")), 413, "pixels"),
        "unknown id": ({"json": {"id": "no-such-image"}}, 404, "not in the index"),
        "id not a string": ({"json": {"id": 12}}, 404, "not in the index"),
        "k zero": (up(jpeg, k="0"), 400, "out of range"),
        "k too big": ({"json": {"id": ds.db.ids[0], "k": 51}}, 400, "out of range"),
        "k not a number": (up(jpeg, k="ten"), 400, "expected an integer"),
        "unknown re-ranker": (up(jpeg, rerank="magic"), 400, "not offered"),
        "re-ranker not offered": ({"json": {"id": ds.db.ids[0], "rerank": "sv"}}, 400, "not offered"),
        "box of three numbers": (up(jpeg, bbx="1,2,3"), 400, "four numbers"),
        "box not numbers": (up(jpeg, bbx="a,b,c,d"), 400, "four numbers"),
        "box inverted": (up(jpeg, bbx="50,50,10,10"), 400, "x1 < x2"),
        "box outside": (up(jpeg, bbx="5000,5000,6000,6000"), 400, "outside"),
        "no image field": ({"files": {"photo": ("x.jpg", jpeg, "image/jpeg")}}, 400, "no 'image'"),
        "malformed JSON": ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
                           "malformed JSON"),
        "JSON without id": ({"json": {"name": "x"}}, 400, "expected"),
        "wrong content type": ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415,
                               "content type"),
    }


@pytest.mark.parametrize("case", [
    "not an image", "zero bytes", "truncated", "too many bytes", "too many pixels", "decompression bomb",
    "unknown id", "id not a string", "k zero", "k too big", "k not a number", "unknown re-ranker",
    "re-ranker not offered", "box of three numbers", "box not numbers", "box inverted", "box outside",
    "no image field", "malformed JSON", "JSON without id", "wrong content type",
])
def test_bad_search_gets_a_4xx_json_error_and_the_next_request_succeeds(bench, client, bad_requests, case):
    ds = bench[0]
    kwargs, status, words = bad_requests[case]
    r = client.post("/search", **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    good = client.post("/search", json={"id": ds.db.ids[0], "k": 3})
    assert good.status_code == 200 and good.json()["results"][0]["id"] == ds.db.ids[0]


def test_bad_batches_and_thumbnails(bench, client):
    ds = bench[0]
    jpeg = ds.db.paths[0].read_bytes()
    five = [("images", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(5)]
    assert client.post("/search/batch", files=five).status_code == 400  # over max_batch = 4
    r = client.post("/search/batch", files=five[:2], data={"bbx": ["1,1,9,9"]})
    assert r.status_code == 400 and "1 boxes for 2 images" in r.json()["error"]
    r = client.post("/search/batch", files=[five[0], ("images", ("b.jpg", b"", "image/jpeg"))])
    assert r.status_code == 400 and "images[1]" in r.json()["error"]
    assert client.post("/search/batch", json={"ids": []}).status_code == 400
    assert client.post("/search/batch", json={"ids": ["x"] * 5}).status_code == 413
    for path in ("no-such-image", "../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd"):
        r = client.get(f"/thumb/{path}")
        assert r.status_code == 404 and "error" in r.json()
    assert client.get(f"/thumb/{ds.db.ids[0]}", params={"size": 5000}).status_code == 400
    assert client.get(f"/thumb/{ds.db.ids[0]}", params={"size": "big"}).status_code == 422
    assert client.post("/search", json={"id": ds.db.ids[0]}).status_code == 200


# ---------------------------------------------------------------- the pieces


def test_decode_image_limits_and_parsers(tmp_path):
    jpeg = write_jpeg(tmp_path / "a.jpg", (80, 60)).read_bytes()
    assert decode_image(jpeg).size == (80, 60)
    with pytest.raises(RequestError, match="over the limit") as err:
        decode_image(jpeg, Limits(max_bytes=100))
    assert err.value.status == 413
    with pytest.raises(RequestError, match="4800 pixels"):
        decode_image(jpeg, Limits(max_pixels=1000))
    assert parse_bbx(" ") is None and parse_bbx([1, 2, 3, 4]) == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(RequestError, match="four numbers"):
        parse_bbx("1,2,nan,4")
    assert parse_k(None) == 10 and parse_k("3") == 3
    for bad in ("0", 2.5, "x", 101):
        with pytest.raises(RequestError):
            parse_k(bad)


def test_image_table_from_folder_and_csv(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    write_jpeg(tmp_path / "imgs" / "a" / "x1.jpg")
    write_jpeg(tmp_path / "imgs" / "y2.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    table = image_table(tmp_path / "imgs")
    assert set(table.paths) == {"a/x1", "x1", "y2"}
    csv = tmp_path / "list.csv"
    csv.write_text(f"id,path,landmark_id\nq,{tmp_path / 'imgs' / 'y2.png'},7\nr,imgs/a/x1.jpg,\n")
    table = image_table(csv)
    assert table.labels == {"q": "7"} and table.paths["r"] == tmp_path / "imgs" / "a" / "x1.jpg"
    with pytest.raises(FileNotFoundError, match="no such file"):
        image_table(tmp_path / "missing")


def test_service_refuses_a_mismatched_net_and_unservable_rerankers(bench):
    import torch

    ds, service, db_h5, _ = bench
    ids, feats, attrs = read_features(db_h5)
    torch.manual_seed(0)
    other = create_model(architecture="test_efficientnet", pretrained=None, pooling="gem", fc_dim=16)
    with pytest.raises(ValueError, match="16-d descriptors"):
        load_service(other, db_h5)
    with pytest.raises(ValueError, match="l2019 and sv"):
        load_service(service.net, db_h5, methods=["adba+sv"])
    with pytest.raises(ValueError, match="unknown step"):
        load_service(service.net, db_h5, methods=["magic"])
    thumbless = load_service(service.net, db_h5, table=ImageTable())
    with pytest.raises(RequestError, match="no image file is known"):
        thumbless.thumbnail(ids[0])
    assert json.dumps(thumbless.info())


def test_service_searches_a_saved_index_of_its_features(bench, tmp_path):
    """serve --index: plain kNN requests go to the saved index; it must hold the file's rows, unwhitened."""
    from retrieval.features import write_features
    from retrieval.index import build_index, save_index

    ds, service, db_h5, q_h5 = bench
    ids = read_features(db_h5)[0]
    _, queries, _ = read_features(q_h5)
    index, stats = build_index(db_h5, "HNSW8")
    folder = save_index(tmp_path / "hnsw", index, ids, {**stats, "whiten": None})
    indexed = load_service(service.net, db_h5, table=dataset_table(ds), methods=["aqe"], index=folder,
                           params={"efsearch": 200})
    assert indexed.info()["index"]["type"] == f"HNSW8 ({len(ids)} vectors, efsearch=200)"
    results, _ = indexed.search(queries, 5)
    expected, _ = service.search(queries, 5)
    assert [[r["id"] for r in row] for row in results] == [[r["id"] for r in row] for row in expected]
    reranked, _ = indexed.search(queries, 5, "aqe")  # chains still search the vectors exactly
    assert reranked == service.search(queries, 5, "aqe")[0]
    save_index(tmp_path / "whitened", index, ids, {**stats, "whiten": "pca"})
    with pytest.raises(ValueError, match="built on rows whitened by 'pca'"):
        load_service(service.net, db_h5, index=tmp_path / "whitened")
    other = write_features(tmp_path / "other.h5", ids[::-1], read_features(db_h5)[1][::-1].copy())
    with pytest.raises(ValueError, match="was built on other rows than"):
        load_service(service.net, other, index=folder)
