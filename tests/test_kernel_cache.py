"""autotune.KernelCache: entries keyed by device, op, dtype and shape bucket, stale when a candidate's source
changed, atomic and safe under concurrent writers, and a corrupt or foreign entry a warning and a miss."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os

import pytest

from autotune.kernel_cache import CacheEntry, KernelCache, device_key, source_hash

CANDIDATES = {"cublas": "aaaa", "triton_gemv": "bbbb"}


def entry(bucket: int = 1, winner: str = "triton_gemv", config: dict | None = None) -> CacheEntry:
    return CacheEntry(op="compiled_llm::linear", dtype="bfloat16", bucket={"rows": bucket, "n": 4096, "k": 4096},
                      candidates=dict(CANDIDATES), winner=winner, config=config or {"BLOCK_N": 8},
                      times_us={"cublas": 15.1, "triton_gemv": 11.2})  # fmt: skip


def test_an_entry_round_trips_as_readable_json(tmp_path):
    cache = KernelCache(tmp_path, key="gpu-a")
    path = cache.put(entry())
    assert path.is_relative_to(tmp_path / "kernels" / "gpu-a")
    stored = json.loads(path.read_text())
    assert stored["winner"] == "triton_gemv" and stored["times_us"]["cublas"] == 15.1 and stored["tuned_at"]
    got = cache.get("compiled_llm::linear", "bfloat16", {"rows": 1, "n": 4096, "k": 4096}, CANDIDATES)
    assert got is not None and got.winner == "triton_gemv" and got.config == {"BLOCK_N": 8}
    assert [e.bucket["rows"] for e in cache.entries()] == [1]


def test_every_part_of_the_key_separates_entries(tmp_path):
    cache = KernelCache(tmp_path, key="gpu-a")
    cache.put(entry(bucket=1))
    bucket = {"rows": 1, "n": 4096, "k": 4096}
    assert cache.get("compiled_llm::linear", "bfloat16", {**bucket, "rows": 2}, CANDIDATES) is None
    assert cache.get("compiled_llm::linear", "float16", bucket, CANDIDATES) is None
    assert cache.get("compiled_llm::fp8_linear", "bfloat16", bucket, CANDIDATES) is None
    assert KernelCache(tmp_path, key="gpu-b").get("compiled_llm::linear", "bfloat16", bucket, CANDIDATES) is None


def test_a_changed_candidate_source_makes_the_entry_stale(tmp_path, caplog):
    cache = KernelCache(tmp_path, key="gpu-a")
    cache.put(entry())
    bucket = {"rows": 1, "n": 4096, "k": 4096}
    assert cache.get("compiled_llm::linear", "bfloat16", bucket, {**CANDIDATES, "triton_gemv": "cccc"}) is None
    assert cache.get("compiled_llm::linear", "bfloat16", bucket, {"cublas": "aaaa"}) is None  # the winner is gone
    assert cache.get("compiled_llm::linear", "bfloat16", bucket, CANDIDATES) is not None


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "format", "fields"])
def test_a_corrupt_or_foreign_entry_is_a_warning_and_a_miss_never_a_crash(tmp_path, caplog, damage):
    cache = KernelCache(tmp_path, key="gpu-a")
    path = cache.put(entry(bucket=1))
    other = cache.put(entry(bucket=2))
    data = json.loads(path.read_text())
    text = {
        "garbage": "\x00\xff not json",
        "truncated": path.read_text()[:40],
        "foreign": other.read_text(),  # another key's entry copied over this one
        "format": json.dumps({**data, "format": 99}),
        "fields": json.dumps({**data, "unexpected": 1}),
    }[damage]
    path.write_text(text, errors="surrogateescape")
    with caplog.at_level(logging.WARNING, logger="compiled_llm.autotune"):
        assert cache.get("compiled_llm::linear", "bfloat16", {"rows": 1, "n": 4096, "k": 4096}, CANDIDATES) is None
    assert any("kernel cache" in r.getMessage() for r in caplog.records)
    assert len(cache.entries()) == (2 if damage == "foreign" else 1)  # listing skips what it cannot read
    cache.put(entry(bucket=1))  # a re-tune overwrites it
    assert cache.get("compiled_llm::linear", "bfloat16", {"rows": 1, "n": 4096, "k": 4096}, CANDIDATES) is not None


def test_a_write_that_fails_midway_leaves_the_old_entry_and_no_temporary_file(tmp_path, monkeypatch):
    cache = KernelCache(tmp_path, key="gpu-a")
    path = cache.put(entry(winner="cublas"))

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.put(entry(winner="triton_gemv"))
    assert json.loads(path.read_text())["winner"] == "cublas"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def _writer(cache_dir: str, name: str, rounds: int) -> None:
    cache = KernelCache(cache_dir, key="gpu-a")
    for i in range(rounds):
        for bucket in (1, 2, 4):
            cache.put(entry(bucket=bucket, winner="cublas" if name == "a" else "triton_gemv",
                            config={"writer": name, "round": i, "padding": "x" * 4000}))  # fmt: skip


def test_two_processes_writing_the_same_entries_never_leave_or_show_a_torn_file(tmp_path, caplog):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(tmp_path), name, 60)) for name in ("a", "b")]
    for writer in writers:
        writer.start()
    cache = KernelCache(tmp_path, key="gpu-a")
    reads = 0
    while any(w.is_alive() for w in writers):
        for bucket in (1, 2, 4):  # every entry a reader meets is whole, whoever wrote it last
            bucket = {"rows": bucket, "n": 4096, "k": 4096}
            found = cache.get("compiled_llm::linear", "bfloat16", bucket, CANDIDATES)
            if found is None:  # not written yet: a torn file would have been a warning
                assert not caplog.records
                continue
            assert found.config["writer"] in ("a", "b") and len(found.config["padding"]) == 4000
            reads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert reads > 0
    final = cache.entries()
    assert len(final) == 3 and all(e.config["round"] == 59 for e in final)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_bucket_with_tuples_is_found_again_and_clear_empties_the_cache(tmp_path):
    cache = KernelCache(tmp_path, key="gpu-a")
    tupled = entry()
    tupled.bucket = {"shape": (16, 4096), "rows": 1}
    cache.put(tupled)
    found = cache.get("compiled_llm::linear", "bfloat16", {"rows": 1, "shape": (16, 4096)}, CANDIDATES)
    assert found is not None and found.bucket == {"rows": 1, "shape": [16, 4096]}
    assert cache.clear() == 1 and cache.entries() == []


def test_keys_and_source_hashes():
    assert device_key("cpu").startswith("cpu-") and "torch" in device_key("cpu") and "/" not in device_key("cpu")
    assert source_hash("def f(): pass") == source_hash("def f(): pass") != source_hash("def f(): return 1")
    assert len(source_hash(test_keys_and_source_hashes)) == 16
