"""The load check's command line is the server's, with vLLM's loader in place of the API server;
its results are gathered per rank; PP parity is a parameter-by-parameter comparison."""

import json
import sys
from pathlib import Path

import pytest

from servematrix.serve import loadcheck
from servematrix.serve.server import LaunchSpec


def spec(argv=None, **kw):
    argv = argv or [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--port", "8000",
                    "--pipeline-parallel-size", "2", "--dtype", "bfloat16"]
    return LaunchSpec(argv=argv, env={"SERVEMATRIX_FIXES": "dsa-indexer-pp-42944"}, port=8000,
                      log_path=Path("/tmp/x.log"), startup_timeout=60, **kw)


def test_the_check_runs_the_worker_with_the_servers_own_arguments_and_no_path_shadowing(tmp_path):
    check = loadcheck.Check(attention={"sparse": "FLASHMLA_SPARSE", "mla": "TRITON_MLA"}, out=tmp_path)
    argv = loadcheck.command(spec(), check)
    assert argv[:3] == [sys.executable, "-P", str(loadcheck.WORKER)]
    assert f"--loadcheck-out={tmp_path}" in argv
    assert "--loadcheck-sparse-backend=FLASHMLA_SPARSE" in argv and "--loadcheck-mla-backend=TRITON_MLA" in argv
    assert argv[-8:] == ["--model", "/m", "--port", "8000", "--pipeline-parallel-size", "2", "--dtype", "bfloat16"]
    assert "vllm.entrypoints.openai.api_server" not in argv and "--loadcheck-construct-only" not in argv


def test_a_construct_only_check_says_so_to_the_worker(tmp_path):
    argv = loadcheck.command(spec(), loadcheck.Check(load_weights=False, out=tmp_path))
    assert "--loadcheck-construct-only" in argv


def test_a_draft_check_asks_the_worker_to_load_the_speculative_draft_too(tmp_path):
    from servematrix.serve import loadcheck_worker

    argv = loadcheck.command(spec(), loadcheck.Check(out=tmp_path, draft=True))
    assert "--loadcheck-draft" in argv
    args, server_argv = loadcheck_worker._args(argv[3:])
    assert args.loadcheck_draft and "--loadcheck-draft" not in server_argv
    assert "--loadcheck-draft" not in loadcheck.command(spec(), loadcheck.Check(out=tmp_path))


def test_the_recorded_command_carries_the_environment_the_fix_modules_read(tmp_path):
    text = loadcheck.shell(spec(), loadcheck.Check(out=tmp_path))
    assert text.startswith("SERVEMATRIX_FIXES=dsa-indexer-pp-42944 ") and "loadcheck_worker.py" in text


def test_a_command_that_is_not_a_vllm_server_is_refused(tmp_path):
    with pytest.raises(ValueError):
        loadcheck.command(spec(["python", "vllm.entrypoints.openai.api_server"]), loadcheck.Check(out=tmp_path))
    with pytest.raises(ValueError):
        loadcheck.command(spec(["python", "-m", "http.server"]), loadcheck.Check(out=tmp_path))


def write_rank(out, rank, ok, digests=None, **kw):
    data = {"rank": rank, "ok": ok, "pid": 100 + rank, "tp": 1, "pp": 2, "seconds": 1.0, **kw}
    if digests is not None:
        data["digests"] = digests
    (out / f"rank{rank}.json").write_text(json.dumps(data))


def test_ranks_are_gathered_and_their_digests_joined(tmp_path):
    write_rank(tmp_path, 0, True, {"a": "x"}, parameters=1, numel=10)
    write_rank(tmp_path, 1, True, {"b": "y"}, parameters=1, numel=20)
    result = loadcheck._collect(tmp_path, 3.0)
    assert result.ok and result.digests == {"a": "x", "b": "y"}
    assert [r.numel for r in result.ranks] == [10, 20]


def test_one_failed_rank_fails_the_check_and_no_partial_digests_are_kept(tmp_path):
    write_rank(tmp_path, 0, True, {"a": "x"})
    write_rank(tmp_path, 1, False, error="KeyError: 'model.layers.0.self_attn.indexer.wk_weights_proj.weight'")
    result = loadcheck._collect(tmp_path, 3.0)
    assert not result.ok and result.digests == {}
    assert result.ranks[1].error.startswith("KeyError")


def test_no_rank_reporting_is_a_failed_check(tmp_path):
    assert not loadcheck._collect(tmp_path, 1.0).ok


def test_a_checks_shared_memory_segments_are_removed_and_no_one_elses(tmp_path):
    from servematrix.serve import loadcheck_worker

    ours = ["servematrix-sweep-7-3-tp:0-[0-1]-cpushm_0", "servematrix-sweep-7-3-pp:0-[0-1]-cpushm_1"]
    others = ["servematrix-sweep-7-31-tp:0-[0-1]-cpushm_0", "vllm_dist_ab12-tp:0-[0-1]-cpushm_0", "psm_0cc3dc18"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    assert loadcheck_worker.remove_shm("servematrix-sweep-7-3", str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert loadcheck_worker.remove_shm("servematrix-sweep-7-3", str(tmp_path / "gone")) == 0


def test_a_finished_rank_stays_until_every_peer_has_its_result(tmp_path):
    """Rank 0 hosts the group's TCP store: leaving before a peer is done broke that peer (Broken pipe)."""
    import threading

    from servematrix.serve import loadcheck_worker

    (tmp_path / "rank0.json").write_text("{}")
    late = threading.Timer(0.3, lambda: (tmp_path / "rank1.json").write_text("{}"))
    late.start()
    loadcheck_worker._wait_for_peers(str(tmp_path), 2, timeout=30)
    peer_done = (tmp_path / "rank1.json").exists()  # before join(): the wait, not the join, saw it
    late.join()
    assert peer_done


def test_a_peer_that_never_reports_does_not_hold_a_rank_forever(tmp_path):
    from servematrix.serve import loadcheck_worker

    (tmp_path / "rank0.json").write_text("{}")
    loadcheck_worker._wait_for_peers(str(tmp_path), 2, timeout=0.2)
    assert not (tmp_path / "rank1.json").exists()
