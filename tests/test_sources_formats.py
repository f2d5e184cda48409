"""The file formats of data/formats.py: CSV, WebDataset tars, ArrayRecord shards written by
prepare, caption folders. Each holds the same 64 records as a JSONL reference, one of them
broken: each must give the reference's batches (test_pipeline.py checks the JSONL ones against
the documented rules), count its broken record once by reason, resume exactly, give each of
two processes its own rows, and read a fake bucket (s3:// paths on an in-memory fsspec
filesystem behind etils.epath) exactly as it reads local files. Also: the CSV corner cases,
shard patterns, the on-disk index cache, and a training run on a CSV."""

import csv
import gzip
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem
from test_data_sources import caption_for, write_jpeg
from test_pipeline import config, take
from train_helpers import tiny_config

from beta_clip_jax.data import csv_source, fileio, index_cache, pipeline, prepare, sources
from beta_clip_jax.tokenizer import Tokenizer

N, BAD, SIZE, STEPS = 64, 37, 24, 10  # 10 batches of 8: the stream crosses an epoch
# The broken record of each format and the skip reason it counts as.
REASON = {
    "csv": "missing_image",  # a row naming a file that does not exist
    "webdataset": "bad_record",  # a sample with no image member
    "array_record": "bad_record",  # a record that is not msgpack
    "folder": "bad_record",  # an image with no caption file
}
FORMATS = tuple(REASON)
UPLOADS = {"csv": ["data.csv", "images"], "webdataset": ["wds"], "array_record": ["ar"]}


def _caption(i):
    # A quoted newline and a quote: the CSV index must keep row 5 one record of two lines.
    return caption_for(i) + ('\nSecond line, "quoted"' if i == 5 else "")


def _hierarchy(i):
    """Precomputed sentences + phrases on every fourth record; the others are derived."""
    if i % 4:
        return {}
    return {"sentences": [f"photo {i}", "a red car"], "phrases": [f"photo {i}"]}


def _write_jsonl(path, entries):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries)
    return str(path)


def _write_csv(root):
    """data.csv (open_clip's columns + JSON hierarchy columns); row BAD names a missing file."""
    rows, reference = [], []
    for i in range(N):
        image = "images/missing.jpg" if i == BAD else f"images/{i:03d}.jpg"
        extra = _hierarchy(i)
        cells = [json.dumps(extra[k]) if k in extra else "" for k in ("sentences", "phrases")]
        rows.append([image, _caption(i), *cells])
        reference.append({"image": image, "caption": _caption(i), **extra})
    with open(root / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", "sentences", "phrases"])
        writer.writerows(rows)
    return {"path": str(root / "data.csv")}, {"path": _write_jsonl(root / "csv.jsonl", reference)}


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_webdataset(root):
    """3 tar shards: odd samples caption by .txt, even ones by .json; sample BAD has no image."""
    os.makedirs(root / "wds")
    tars = [tarfile.open(root / "wds" / f"shard-{k:03d}.tar", "w") for k in range(3)]
    reference = []
    for i in range(N):
        tar, key = tars[i * 3 // N], f"part/{i:06d}"
        if i != BAD:
            _add(tar, f"{key}.jpg", (root / "images" / f"{i:03d}.jpg").read_bytes())
        if i % 2:
            _add(tar, f"{key}.txt", _caption(i).encode() + b"\n")
        else:
            _add(tar, f"{key}.json", json.dumps({"caption": _caption(i), **_hierarchy(i)}).encode())
        _add(tar, f"{key}.cls", b"3")  # a member of no known kind is ignored
        image = {} if i == BAD else {"image": f"images/{i:03d}.jpg"}
        reference.append({**image, "caption": _caption(i), **_hierarchy(i)})
    for tar in tars:
        tar.close()
    data = {"path": str(root / "wds" / "shard-{000..002}.tar")}
    return data, {"path": _write_jsonl(root / "wds.jsonl", reference)}


def _write_array_record(root):
    """prepare (CSV in, 3 ArrayRecord shards out, the missing image dropped) plus one shard
    holding a record that is not msgpack; the reference is prepare's JSONL of the same CSV."""
    stats = prepare.prepare(
        str(root / "data.csv"), "csv", str(root / "ar" / "train"),
        out_format="array_record", shards=3,
    )  # fmt: skip
    prepare.prepare(str(root / "data.csv"), "csv", str(root / "prepared.jsonl"))
    extra = str(root / "ar" / "extra.array_record")
    writer = ArrayRecordWriter(extra, "group_size:1")
    writer.write(b"\xc1 not msgpack")
    writer.close()
    with open(root / "prepared.jsonl", "a") as f:
        f.write("not json\n")
    data = {"path": None, "shards": (stats["data_path"], extra)}
    return data, {"path": str(root / "prepared.jsonl")}, stats


def _write_folder(root):
    """folder/a (records 0-31), folder/b (32-63): .json captions with the hierarchy on every
    fourth image, .txt on the others; image BAD has none."""
    reference = []
    for i in range(N):
        rel = f"{'ab'[i // 32]}/{i:03d}"
        (root / "folder" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "folder" / f"{rel}.jpg").write_bytes(
            (root / "images" / f"{i:03d}.jpg").read_bytes()
        )
        if i == BAD:
            reference.append({"image": f"{rel}.jpg"})
            continue
        if _hierarchy(i):
            meta = {"caption": _caption(i), **_hierarchy(i)}
            (root / "folder" / f"{rel}.json").write_text(json.dumps(meta))
        else:
            (root / "folder" / f"{rel}.txt").write_text(_caption(i).replace("\n", " "))
        reference.append(
            {"image": f"{rel}.jpg", "caption": _caption(i).replace("\n", " "), **_hierarchy(i)}
        )
    ref = {
        "path": _write_jsonl(root / "folder.jsonl", reference),
        "image_root": str(root / "folder"),
    }
    return {"path": str(root / "folder")}, ref


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """format -> (its data fields, the reference JSONL's), plus prepare's summary."""
    root = tmp_path_factory.mktemp("formats")
    for i in range(N):
        write_jpeg(str(root / "images" / f"{i:03d}.jpg"), i)
    csv_layout = _write_csv(root)
    array_record, reference, stats = _write_array_record(root)  # prepare reads data.csv
    return {
        "root": root,
        "prepare": stats,
        "csv": csv_layout,
        "webdataset": _write_webdataset(root),
        "array_record": (array_record, reference),
        "folder": _write_folder(root),
    }


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _cfg(name, fields, cache, **overrides):
    return config(name, fields.get("path"), fields.get("image_root"), index_cache=str(cache),
                  **{k: v for k, v in fields.items() if k not in ("path", "image_root")},
                  **overrides)  # fmt: skip


def _iterator(cfg, tok, batch=8, **kw):
    return pipeline.build_train_iterator(
        cfg, batch_size_per_process=batch, seed=3, image_size=SIZE, tokenizer=tok, **kw
    )


def _assert_same(a, b):
    assert len(a) == len(b)
    for s, (x, y) in enumerate(zip(a, b, strict=True)):
        assert sorted(x) == sorted(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"batch {s} {key}")


def _skips(it):
    return {k: v for k, v in it.metrics().items() if k.startswith("data/skipped") and v}


@pytest.mark.parametrize("fmt", FORMATS)
def test_batches_equal_the_jsonl_of_the_same_records(layouts, tok, tmp_path, fmt):
    data, reference = layouts[fmt]
    it = _iterator(_cfg(fmt, data, tmp_path), tok)
    ref = _iterator(_cfg("jsonl", reference, tmp_path), tok)
    got = take(it, STEPS)
    _assert_same(got, take(ref, STEPS))
    assert all(len(b["image"]) == 8 for b in got)  # the broken slot was refilled
    assert _skips(it) == {f"data/skipped_{REASON[fmt]}": 1}  # once, over two epochs
    assert it.metrics() == ref.metrics()


def test_prepare_wrote_array_record_shards_of_the_csv(layouts, tmp_path):
    stats = layouts["prepare"]
    assert stats["written"] == N - 1 and stats["out_format"] == "array_record"
    # Row BAD starts on line 2 + BAD + 1: the header, and row 5's quoted newline.
    assert [(d["line"], d["reason"]) for d in stats["dropped"]] == [(BAD + 3, "missing_image")]
    assert stats["data_path"].endswith("train-{00000..00002}-of-00003.array_record")
    shards = fileio.expand_shards(stats["data_path"], ".array_record", "ArrayRecord")
    assert [os.path.basename(p) for p in shards] == [
        f"train-0000{k}-of-00003.array_record" for k in range(3)
    ]
    prefix = str(layouts["root"] / "ar" / "train")  # the PREFIX names the same shards
    source = sources.make_source(_cfg("array_record", {"path": prefix}, ""), SIZE)
    assert len(source) == N - 1
    first = source[0]  # the encoded image itself, and the input line it came from
    assert first["image"] == (layouts["root"] / "images" / "000.jpg").read_bytes()
    assert first["id"] == "train-00000-of-00003.array_record[0] (data.csv:2)"
    assert first["sentences"] == prepare.split_caption(caption_for(0))
    # --noinline_images: the records keep the image path, resolved against data.image_root.
    root = layouts["root"]
    out = str(tmp_path / "paths")
    prepare.prepare(
        str(root / "data.csv"), "csv", out, out_format="array_record", inline_images=False
    )
    cfg = _cfg("array_record", {"path": out, "image_root": str(root)}, "")
    assert sources.make_source(cfg, SIZE)[0]["image_path"] == str(root / "images" / "000.jpg")


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_after_two_batches_continues_exactly(layouts, tok, tmp_path, fmt):
    cfg = _cfg(fmt, layouts[fmt][0], tmp_path)
    want = take(_iterator(cfg, tok), 6)
    it = _iterator(cfg, tok)
    _assert_same(take(it, 2), want[:2])
    state = json.loads(json.dumps(it.get_state()))
    resumed = _iterator(cfg, tok)
    resumed.set_state(state)
    _assert_same(take(resumed, 4), want[2:])


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_processes_read_their_own_rows(layouts, tok, tmp_path, fmt):
    cfg = _cfg(fmt, layouts[fmt][0], tmp_path)
    one = take(_iterator(cfg, tok), 8)  # one epoch: 64 positions
    parts = [take(_iterator(cfg, tok, 4, process_index=i, process_count=2), 8) for i in (0, 1)]
    joined = [{k: np.concatenate([p[s][k] for p in parts]) for k in one[s]} for s in range(8)]
    _assert_same(joined, one)
    seen = [{r.tobytes() for b in p for r in b["caption"]} for p in parts]
    # Disjoint, but for the record that took the broken one's slot.
    assert len(seen[0] & seen[1]) <= 1 and len(seen[0] | seen[1]) == N - 1


class _BucketFS(MemoryFileSystem):
    """An in-memory bucket holding s3:// paths, which it lists without the scheme, as gcsfs
    and s3fs do."""

    protocol, root_marker, store, pseudo_dirs = ("fakebucket",), "", {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("s3://").strip("/")


class _BucketBackend(backend._FileSystemSpecBackend):
    def fs(self, path):
        return _BucketFS()


@pytest.fixture
def bucket(monkeypatch):
    """s3:// paths through etils.epath land in _BucketFS (emptied for each test)."""
    _BucketFS.store.clear()
    _BucketFS.pseudo_dirs[:] = [""]
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "s3", _BucketBackend())
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    return _BucketFS


def _upload(root, rel):
    """Copies root/rel (a file or a folder tree) to s3://bucket/rel."""
    local = root / rel
    files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
    for path in files:
        epath.Path(f"s3://bucket/{path.relative_to(root)}").write_bytes(path.read_bytes())


def _in_bucket(root, fields):
    def move(value):
        if isinstance(value, tuple | list):
            return tuple(move(v) for v in value)
        return value and value.replace(str(root), "s3://bucket")

    return {k: move(v) for k, v in fields.items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_fake_bucket_reads_as_the_local_files(layouts, tok, tmp_path, bucket, fmt):
    root, (data, _) = layouts["root"], layouts[fmt]
    for rel in UPLOADS.get(fmt, [fmt]):
        _upload(root, rel)
    remote = _in_bucket(root, data)
    # The WebDataset index is cached in the bucket itself (a pod's hosts can share it).
    cache = "s3://bucket/cache" if fmt == "webdataset" else tmp_path
    want = take(_iterator(_cfg(fmt, data, tmp_path), tok), 3)
    it = _iterator(_cfg(fmt, remote, cache), tok)
    _assert_same(take(it, 3), want)
    source = sources.make_source(_cfg(fmt, remote, cache), SIZE)
    assert len(source) == N
    if fmt in ("csv", "folder"):
        assert source[0]["image_path"].startswith("s3://bucket/")
    if fmt == "webdataset":
        assert [k for k in bucket.store if k.startswith("bucket/cache/index/webdataset-")]
    if fmt == "array_record":  # ArrayRecordReader reads local and gs:// files: copied once
        assert len(list((tmp_path / "staged").rglob("*.array_record"))) == 4


def test_our_jsonl_reads_from_a_fake_bucket_too(layouts, tok, tmp_path, bucket):
    root = layouts["root"]
    for rel in ("csv.jsonl", "images"):
        _upload(root, rel)
    local, remote = layouts["csv"][1], _in_bucket(root, layouts["csv"][1])
    want = take(_iterator(_cfg("jsonl", local, tmp_path), tok), 3)
    _assert_same(take(_iterator(_cfg("jsonl", remote, tmp_path), tok), 3), want)
    assert sources.make_source(_cfg("jsonl", remote, ""), SIZE)[1]["image_path"] == (
        "s3://bucket/images/001.jpg"
    )


def test_csv_corner_cases(tmp_path):
    write_jpeg(str(tmp_path / "a.jpg"), 0)
    rows = [
        "\ufeffimage\tcaption\n",  # a byte-order mark before the header
        "a.jpg\tfirst caption\n",
        "\n",  # a blank line is no record
        'a.jpg\t"two\nlines"\n',
        "a.jpg\n",  # too few fields
        "../a.jpg\tescapes the root\n",
    ]
    path = tmp_path / "d.tsv"
    path.write_bytes("".join(rows).encode() + b"a.jpg\t\xff bad utf-8\n")
    with pytest.raises(ValueError, match=r"no column 'filepath' \(data.image_key\)"):
        csv_source.CsvSource(str(path), index_cache_dir="")
    source = csv_source.CsvSource(str(path), image_key="image", caption_key="caption")
    assert len(source) == 5 and [source.line_number(i) for i in range(5)] == [2, 4, 6, 7, 8]
    assert source[0]["image_path"] == str(tmp_path / "a.jpg")
    assert source[1]["caption"] == "two\nlines"
    with pytest.raises(ValueError, match="1 fields where the header has 2"):
        source[2]
    with pytest.raises(sources.UnsafePathError):
        source[3]
    with pytest.raises(UnicodeDecodeError):
        source[4]
    gz = tmp_path / "d.csv.gz"
    gz.write_bytes(gzip.compress(b"filepath,title\n"))
    with pytest.raises(ValueError, match="compressed CSV"):
        csv_source.CsvSource(str(gz))


def test_shard_patterns(tmp_path):
    assert fileio.expand_braces("s{08..10}-{a,b}.tar") == [
        "s08-a.tar", "s08-b.tar", "s09-a.tar", "s09-b.tar", "s10-a.tar", "s10-b.tar",
    ]  # fmt: skip
    for name in ("x-00000-of-00002.tar", "x-00001-of-00002.tar", "y.tar"):
        (tmp_path / name).write_bytes(b"")
    prefix = fileio.expand_shards(str(tmp_path / "x"), ".tar", "WebDataset")
    assert [os.path.basename(p) for p in prefix] == ["x-00000-of-00002.tar", "x-00001-of-00002.tar"]
    assert len(fileio.expand_shards(str(tmp_path), ".tar", "WebDataset")) == 3
    assert len(fileio.expand_shards([str(tmp_path / "*.tar")], ".tar", "WebDataset")) == 3
    with pytest.raises(FileNotFoundError, match=r"WebDataset shards not found: .*x-7.tar"):
        fileio.expand_shards(str(tmp_path / "x-{6..7}.tar"), ".tar", "WebDataset")
    (tmp_path / "z.tar").write_bytes(gzip.compress(b"not a tar"))
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        sources.make_source(_cfg("webdataset", {"path": str(tmp_path / "z.tar")}, ""), SIZE)


def test_index_is_built_once_and_cached_by_file_identity(layouts, tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    path.write_bytes((layouts["root"] / "data.csv").read_bytes())
    builds = []
    build = csv_source.build_index
    monkeypatch.setattr(csv_source, "build_index", lambda *a: builds.append(a) or build(*a))
    cfg = _cfg("csv", {"path": str(path), "image_root": str(layouts["root"])}, tmp_path / "c")
    assert len(sources.make_source(cfg, SIZE)) == len(sources.make_source(cfg, SIZE)) == N
    index_cache.clear_memory()  # a new process: the index comes from the cache folder
    assert len(sources.make_source(cfg, SIZE)) == N and len(builds) == 1
    with open(path, "a") as f:  # a changed file is indexed again
        f.write("images/000.jpg,one more\n")
    assert len(sources.make_source(cfg, SIZE)) == N + 1 and len(builds) == 2


def test_open_image_takes_bytes_and_file_objects(layouts):
    path = layouts["root"] / "images" / "001.jpg"
    want = np.asarray(sources.open_image(str(path)))
    for src in (path.read_bytes(), bytearray(path.read_bytes()), io.BytesIO(path.read_bytes())):
        np.testing.assert_array_equal(np.asarray(sources.open_image(src)), want)


def test_training_run_on_a_csv(layouts, tmp_path, monkeypatch):
    from beta_clip_jax.config_check import train_set_size
    from beta_clip_jax.reporting.metrics_writer import read_metrics
    from beta_clip_jax.train import train_and_evaluate

    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["filepath", "title"]] + [
            [f"images/{i:03d}.jpg", caption_for(i)] for i in range(N)
        ])  # fmt: skip
    builds = []
    build = csv_source.build_index
    monkeypatch.setattr(csv_source, "build_index", lambda *a: builds.append(a) or build(*a))
    overrides = {"data.name": "csv", "data.path": str(path), "data.index_cache": str(tmp_path)}
    overrides["data.image_root"] = str(layouts["root"])
    config = tiny_config(stop_at_step=3, **overrides)  # num_steps 6: the shared compile
    train_and_evaluate(config, str(tmp_path / "run"))
    steps = [r for r in read_metrics(str(tmp_path / "run")) if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in steps)
    assert train_set_size(config) == N and len(builds) == 1  # one index for the whole run


@pytest.mark.parametrize("fmt", FORMATS)
def test_sources_pickle_small_for_worker_processes(layouts, tmp_path, fmt):
    source = sources.make_source(_cfg(fmt, layouts[fmt][0], tmp_path), SIZE)
    copy = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 64 * 1024  # offsets and names, not the data
    assert copy[1] == source[1] and len(copy) == N


def test_a_cut_shard_keeps_the_samples_before_the_cut(layouts, tmp_path, caplog):
    """A shard cut inside its 4th sample's json: 4 samples, the 4th a bad record."""
    first = min(i for i in range(N) if i * 3 // N == 2)  # the first record of shard 2
    path = layouts["root"] / "wds" / "shard-002.tar"
    with tarfile.open(path) as tar:
        meta = tar.getmember(f"part/{first + 3:06d}.json")
    (tmp_path / "cut.tar").write_bytes(path.read_bytes()[: meta.offset_data + meta.size // 2])
    full = sources.make_source(_cfg("webdataset", layouts["webdataset"][0], ""), SIZE)
    cut = sources.make_source(_cfg("webdataset", {"path": str(tmp_path / "cut.tar")}, ""), SIZE)
    assert len(cut) == 4 and "cut short" in caplog.text
    assert [cut[k]["image"] for k in range(3)] == [full[first + k]["image"] for k in range(3)]
    with pytest.raises(ValueError, match="changed since it was indexed"):
        cut[3]


# The training runs read the RUN_RECORDS records from the broken one's (or the last
# RUN_RECORDS): three steps of 8 are one epoch of them, so the broken record is always read.
RUN_RECORDS = 24
BROKEN_INDEX = {"array_record": N - 1}  # the not-msgpack shard comes last; the others: BAD


def _train_config(fmt, fields, cache, stop_at_step):
    overrides = {f"data.{k}": v for k, v in fields.items()}
    overrides.update({
        "data.name": fmt, "data.index_cache": str(cache), "data.max_records": RUN_RECORDS,
        "data.skip_first": min(BROKEN_INDEX.get(fmt, BAD), N - RUN_RECORDS),
        "data.max_skip_fraction": 0.05,  # 1 of 24: above the default's 1%, which would stop
    })  # fmt: skip
    return tiny_config(stop_at_step=stop_at_step, **overrides)  # num_steps 6: the shared compile


def _steps(workdir):
    from beta_clip_jax.reporting.metrics_writer import read_metrics

    return {r["step"]: r for r in read_metrics(str(workdir)) if "train/loss" in r}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_run_from_a_bucket_stopped_at_step_2_resumes_as_the_local_uninterrupted_run(
    layouts, tmp_path, bucket, fmt
):
    """3 steps on the local files, uninterrupted; the same 3 from the files in a fake bucket,
    stopped after step 2 and resumed: the same losses (the same batches: the data state is
    restored exactly) and the broken record counted once by its reason, in both runs."""
    from beta_clip_jax.train import train_and_evaluate

    root, local = layouts["root"], layouts[fmt][0]
    train_and_evaluate(_train_config(fmt, local, tmp_path / "local", 3), str(tmp_path / "full"))
    for rel in UPLOADS.get(fmt, [fmt]):
        _upload(root, rel)
    remote, workdir = _in_bucket(root, local), str(tmp_path / "resumed")
    cache = "s3://bucket/cache" if fmt == "webdataset" else tmp_path / "remote"
    train_and_evaluate(_train_config(fmt, remote, cache, 2), workdir)
    assert sorted(_steps(workdir)) == [1, 2]
    train_and_evaluate(_train_config(fmt, remote, cache, 3), workdir)  # restores step 2
    got, want = _steps(workdir), _steps(tmp_path / "full")
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in (1, 2, 3):
        np.testing.assert_allclose(got[step]["train/loss"], want[step]["train/loss"], atol=1e-6)
    for run in (got, want):  # counted once, by its reason, and carried over the restart
        skips = {k: v for k, v in run[3].items() if k.startswith("data/skipped_") and v}
        assert skips == {f"data/skipped_{REASON[fmt]}": 1}


def test_other_processes_read_process_0s_index_from_a_shared_cache(bucket, monkeypatch, tmp_path):
    """A bucket cache folder: process 0 builds and writes the index, process 1 reads it
    (waiting for it if process 0 is late) and builds it only after BETA_CLIP_INDEX_WAIT."""
    import threading

    import jax

    from beta_clip_jax.data import index_cache

    data = tmp_path / "data.bin"
    data.write_bytes(b"0123456789")
    root, built = "s3://bucket/cache", []

    def build():
        built.append(jax.process_index())
        return {"offsets": np.arange(5)}

    def never():
        raise AssertionError("process 1 built the index itself")

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    index_cache.clear_memory()
    index_cache.cached_index("demo", [data], {}, build, root)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    index_cache.clear_memory()
    got = index_cache.cached_index("demo", [data], {}, never, root)
    assert built == [0] and got["offsets"].tolist() == [0, 1, 2, 3, 4]

    # Process 0 late: process 1 waits for its file.
    late = index_cache.cache_root(root) + "/late.npz"
    writer = threading.Timer(0.3, index_cache._save, (late, {"offsets": np.arange(2)}))
    writer.start()
    assert index_cache._wait_for(late, timeout=30, poll=0.05)["offsets"].tolist() == [0, 1]
    writer.join()
    # Never written: after the wait, process 1 builds it (and a local folder waits for nothing).
    monkeypatch.setenv("BETA_CLIP_INDEX_WAIT", "0.2")
    index_cache.clear_memory()
    index_cache.cached_index("other", [data], {}, build, root)
    index_cache.clear_memory()
    index_cache.cached_index("other", [data], {}, build, str(tmp_path / "local_cache"))
    assert built == [0, 1, 1]
    index_cache.clear_memory()
