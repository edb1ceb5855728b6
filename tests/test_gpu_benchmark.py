"""`benchmarks/gpu.py --device cpu`: the GPU check's own code on tiny shapes, as a smoke test."""

import pytest

from benchmarks import gpu


@pytest.mark.slow  # 76 s: the suite's second longest; run with -m slow before changing benchmarks/gpu.py
def test_gpu_check_runs_on_cpu(ray_session, tmp_path, capsys):
    result = gpu.main(["--device", "cpu", "--out", str(tmp_path)])
    tiny = result["shapes"]["tiny"]
    assert tiny["bare"]["tokens_per_s"] > 0 and tiny["train"]["tokens_per_s"] > 0
    assert tiny["train"]["tokens_per_step"] > 0.8 * 4 * 64  # batch 4 of prompts padded to about 64 tokens
    assert 0 < tiny["train"]["estimate_gb"] < 0.1  # the job's estimate of a tiny model on a CPU
    retrieval = result["retrieval"]  # the candidate search beside the backbone's step
    assert retrieval["rows"] == 4096 and retrieval["ms_per_batch"] > 0 and retrieval["recall@R"] > 0.9
    assert retrieval["scan_ms_per_batch"] > 0 and retrieval["scan_recall@R"] > 0.9  # the dense scan beside it
    assert tiny["bare"]["ms_per_step"] > 0
    resume = result["resume"]
    assert resume["resumed"] and resume["start_step"] == 6 and resume["backend"] == "gloo"  # from its checkpoint
    assert resume["val_n"] == 64 and 0.0 <= resume["val_accuracy"] <= 1.0  # validation gathered over the group
    scored = result["evaluate"]  # ray_jobs/evaluate.py on its weights (on a GPU: in a task holding it)
    assert scored["on"] == "eval.device=cpu" and scored["n"] == 64 and 0.0 <= scored["accuracy"] <= 1.0
    answer = result["answer"]
    assert answer["requests"] == 8 and answer["errors"] == 0 and answer["requests_per_s"] > 0
    assert "checks" not in result  # the floors are for a GPU
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("{") and '"shapes"' in last  # one JSON line, last
