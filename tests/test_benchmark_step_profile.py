"""The step_profile suite: XLA:CPU's per-kernel trace of the train step, filed by model part, pass
and kind of kernel."""

import math

from benchmarks import step_profile as profile
from nanodet_jax.config import validate
from tests.configs import light_tiny


def test_classify_reads_part_pass_and_kind_from_op_name():
    fwd = "jit(traced)/jvp(NanoDetPlus)/aux_fpn/downsamples/0/conv/dot_general"
    bwd = "jit(traced)/transpose(jvp(NanoDetPlus))/backbone/stage2/0/branch2/1/mul"
    lib = '%f = f32[8]{0} fusion(%a), kind=kCustom, backend_config={"fusion_config":' \
          '{"kind":"__ynn_fusion"}}'
    assert profile.classify(fwd, "fusion", lib) == ("aux_fpn", "forward", "library")
    assert profile.classify(bwd, "fusion", "kind=kLoop") == ("backbone", "backward", "fusion")
    assert profile.classify("jit(traced)/jvp(vmap())/top_k/", "sort", "") == (
        "loss", "forward", "other")
    assert profile.classify("jit(traced)/update/add", "fusion", "")[0] == "update"
    assert profile.classify("", "copy", "") == ("unattributed", "forward", "copy")
    # a scope named like a part but longer ("headless") is not that part
    assert profile.classify("jit(traced)/jvp(X)/headless/mul", "dot", "")[0] == "loss"


def test_instruction_table_parses_compiled_hlo():
    text = """HloModule m
ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %multiply.3 = f32[4]{0} multiply(%p, %p), metadata={op_name="jit(f)/jvp(N)/head/mul"}
}"""
    table = profile.instruction_table(text)
    assert table["multiply.3"] == ("head", "forward", "other", "jit(f)/jvp(N)/head/mul")
    assert table["p"][0] == "unattributed"


def test_profile_step_accounts_for_the_whole_step():
    cfg = validate(light_tiny(64), "<step profile test>")  # compile-light
    out = profile.profile_step(cfg, 2, steps=1, top=5)
    total = out["kernel_ms"]
    assert total > 0 and out["step_ms"] > 0
    for key in ("by_part", "by_part_and_pass", "by_kind"):  # each is a split of the total
        assert math.isclose(sum(out[key].values()), total, rel_tol=0.01, abs_tol=0.5), key
    for part in ("backbone", "fpn", "aux_fpn", "head", "aux_head", "loss", "update"):
        assert out["by_part"].get(part, 0) > 0, part
    assert out["by_part_and_pass"]["backbone/backward"] > 0
    assert len(out["top"]) == 5
    assert [t["ms"] for t in out["top"]] == sorted((t["ms"] for t in out["top"]), reverse=True)
