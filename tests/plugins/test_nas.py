"""MAE-NAS: scores, structures, budgets, search, latency tables (damo_plugins.nas)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from damo_plugins.core.errors import DamoError
from damo_plugins.models.structure import dumps_text, parse_structure
from damo_plugins.nas.analysis import analyzer_for, join, split
from damo_plugins.nas.backbone import PlainBackbone
from damo_plugins.nas.latency import (
    Calibration,
    LatencyTable,
    fit_calibration,
    measure_backbones,
    profile,
    spearman,
)
from damo_plugins.nas.score import entropy_scores, madnas_structure
from damo_plugins.nas.search import Budgets, Search, SearchConfig
from damo_plugins.nas.space import SearchSpace, round8
from damo_plugins.nas.structures import resolve_structure
from damo_plugins.plugins.nas import score_structure

STEM, K1KX, KXKX = "ConvKXBNRELU", "SuperResConvK1KX", "SuperResConvKXKX"


def tiny(cls: str = K1KX) -> list[dict]:
    return [
        {"class": STEM, "in": 3, "out": 8, "s": 1, "k": 3},
        {"class": cls, "in": 8, "out": 16, "s": 2, "k": 3, "L": 2, "btn": 4},
        {"class": cls, "in": 16, "out": 32, "s": 2, "k": 3, "L": 1, "btn": 8},
    ]


def half_log(x: float) -> float:
    return 0.5 * math.log(x)


# ------------------------------------------------------------------------ madnas
@pytest.mark.parametrize("focus", [True, False])
def test_madnas_k1kx_by_hand(focus: bool) -> None:
    cin = 12 if focus else 3
    l0 = half_log(cin * 9)
    l1 = (half_log(8) + half_log(4 * 9)) + (
        half_log(16) + half_log(4 * 9)
    )  # 1st unit reads 8, 2nd 16
    l2 = half_log(16) + half_log(8 * 9)
    # three stages: [stem], [block 1], [block 2] (stride-2 blocks start stages)
    want = 1 * (l0 + math.log(8)) + 2 * (l0 + l1 + math.log(16)) + 3 * (l0 + l1 + l2 + math.log(32))
    got = madnas_structure(tiny(), resolution=64, focus=focus, alpha=(1, 2, 3))
    assert got == pytest.approx(want, rel=1e-12)


def test_madnas_kxkx_by_hand_and_zero_weights() -> None:
    l0 = half_log(12 * 9)
    l1 = (half_log(8 * 9) + half_log(4 * 9)) + (half_log(16 * 9) + half_log(4 * 9))
    l2 = half_log(16 * 9) + half_log(8 * 9)
    want = 16 * (l0 + l1 + l2 + math.log(32))
    assert madnas_structure(tiny(KXKX), alpha=(0, 0, 16)) == pytest.approx(want, rel=1e-12)


def test_madnas_damo_yolo_backbones() -> None:
    """Regression values of T/S/M (Focus, alpha 0,0,1,1,16); bigger models score higher."""
    t, s, m = (madnas_structure(resolve_structure(n)) for n in ("t", "s", "m"))
    assert t == pytest.approx(1015.1441063, abs=1e-6)
    assert t < s < m


def test_score_invariances() -> None:
    st = resolve_structure("s")
    base = madnas_structure(st)
    # key order, extra upstream keys and the text format change nothing
    shuffled = [dict(reversed(list(b.items())), nbitsA=8, nbitsW=8) for b in st]
    assert madnas_structure(shuffled) == base
    assert madnas_structure(parse_structure(dumps_text(st))) == base
    # doubling every width raises the score
    doubled = [
        dict(b, out=2 * b["out"], **({"btn": 2 * b["btn"]} if "btn" in b else {})) for b in st
    ]
    for a, b in zip(doubled[1:], doubled):
        a["in"] = b["out"]
    assert madnas_structure(doubled) > base
    # so does depth
    deeper = [dict(b, L=b["L"] + 1) if "L" in b else b for b in st]
    assert madnas_structure(deeper) > base


def test_alpha_must_match_stages() -> None:
    with pytest.raises(DamoError, match="3 stages but 5 stage weights"):
        madnas_structure(tiny())


# ------------------------------------------------------------------------ entropy
def test_entropy_agrees_with_madnas_and_is_seeded() -> None:
    st = tiny()
    kw = dict(resolution=128, alpha=(1, 2, 3), batch=8, repeats=2, workers=0)
    e1 = entropy_scores([st], **kw)[0]
    assert e1 == entropy_scores([st], **kw)[0]
    # zero padding makes measured stds a little smaller than the closed form
    mad = madnas_structure(st, alpha=(1, 2, 3))
    assert e1 == pytest.approx(mad, rel=0.02)
    assert e1 < mad


def test_entropy_in_worker_processes_matches_in_process() -> None:
    sts = [tiny(), tiny(KXKX)]
    kw = dict(resolution=64, alpha=(1, 2, 3), batch=4, repeats=2)
    assert entropy_scores(sts, workers=2, **kw) == pytest.approx(
        entropy_scores(sts, workers=0, **kw), rel=1e-6
    )


# ------------------------------------------------------------------------ structures
def test_parse_rejects_bad_structures(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(DamoError, match="neither JSON nor a Python literal"):
        parse_structure(f"open({str(marker)!r}, 'w')")
    assert not marker.exists()  # literal_eval, never eval
    with pytest.raises(DamoError, match="missing key"):
        parse_structure("[{'class': 'ConvKXBNRELU', 'in': 3, 'out': 8}]")
    with pytest.raises(DamoError, match="must be positive"):
        parse_structure(json.dumps([{"class": STEM, "in": 3, "out": -8, "s": 1, "k": 3}]))
    with pytest.raises(DamoError, match="unknown class"):
        parse_structure("[{'class': 'Nope', 'in': 3}]")
    bad = tmp_path / "bad.txt"
    bad.write_text("[{'class': 'ConvKXBNRELU', 'in': 3, 'out': 8, 's': 1, 'k': 3},, ]")
    with pytest.raises(DamoError):
        score_structure(bad)
    with pytest.raises(DamoError, match="structure not found"):
        score_structure(tmp_path / "missing.json")


def test_split_join_roundtrip() -> None:
    for name in ("t", "s", "m"):
        st = resolve_structure(name)
        bp, genome = split(st)
        assert join(bp, genome) == st


# ------------------------------------------------------------------------ FLOPs / params
def _torch_counts(structure: list[dict], res: int, focus: bool, deploy: bool, **kw) -> tuple:
    """FLOPs (``FlopCounterMode``, 2 x MACs) and params of the backbone the builder makes.

    With Focus it is ``build_damo_yolo(...).backbone`` itself; without, the same backbone with
    its Focus stem swapped for a plain conv (``detector_backbone``). Built on the meta device:
    shapes only, no weights to initialise and no arithmetic, so each check takes milliseconds.
    """
    from damo_plugins.models.damo_yolo import build_damo_yolo
    from damo_plugins.nas.backbone import detector_backbone

    with torch.device("meta"):
        if focus:
            net = build_damo_yolo(structure, deploy=deploy, **kw).backbone.eval()
            mine = detector_backbone(structure, deploy=deploy)
            assert [p.shape for p in mine.parameters()] == [p.shape for p in net.parameters()]
        else:
            net = detector_backbone(structure, focus=False, deploy=deploy).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.zeros(1, 3, res, res))
    return counter.get_total_flops(), sum(p.numel() for p in net.parameters())


def _assert_exact(structure: list[dict], res: int, focus: bool, deploy: bool, **kw) -> None:
    an, genome = analyzer_for(structure, res, focus, deploy)
    m = an.metrics(genome)
    assert (m.flops, m.params) == _torch_counts(structure, res, focus, deploy, **kw)


@pytest.mark.parametrize(
    ("name", "res", "focus", "deploy"),
    [
        ("t", 64, True, True),
        ("t", 65, False, False),
        ("s", 96, True, False),
        ("s", 64, False, True),
        ("m", 64, True, True),
        ("m", 96, True, False),
        ("m", 65, False, True),
    ],
)
def test_analytic_flops_params_equal_builder_backbone(
    name: str, res: int, focus: bool, deploy: bool
) -> None:
    """DAMO-YOLO T/S/M as their presets build them: res + SPP (T, S), CSP + SPP (M)."""
    _assert_exact(resolve_structure(name), res, focus, deploy, preset=name)


@pytest.mark.parametrize("kind", ["k1kx", "kxkx"])
def test_analytic_flops_params_equal_builder_on_random_structures(kind: str) -> None:
    space = SearchSpace(kind, kernels=(3, 5))
    for seed in range(10):
        res, focus, deploy = (64, 96, 128)[seed % 3], seed % 2 == 0, seed % 4 < 2
        an, init = space.bind(resolve_structure("init"), res, focus)
        genome = init
        rng = random.Random(seed)
        for _ in range(rng.randint(5, 40)):
            genome = space.mutate(genome, rng)
        _assert_exact(join(an.bp, genome), res, focus, deploy)


def test_analytic_flops_params_exact_on_unusual_layouts() -> None:
    """Corners of both layouts: a stride-1 block right after the stem (its own CSP stage with
    a downsampler), a stride-2 kxkx block with L=1 (a CSP stage without units), a stride-1
    block joining a CSP stage with other widths (shortcut projection), a k1kx block inside
    the CSP layout, odd half-widths, kernel 5, a stem with s=2 (ignored by Focus)."""
    csp = [
        {"class": STEM, "in": 3, "out": 16, "s": 1, "k": 3},
        {"class": KXKX, "in": 16, "out": 16, "s": 1, "k": 3, "L": 1, "btn": 8},
        {"class": KXKX, "in": 16, "out": 32, "s": 2, "k": 3, "L": 1, "btn": 8},
        {"class": KXKX, "in": 32, "out": 50, "s": 1, "k": 5, "L": 2, "btn": 16},
        {"class": K1KX, "in": 50, "out": 64, "s": 2, "k": 3, "L": 3, "btn": 16},
        {"class": KXKX, "in": 64, "out": 64, "s": 2, "k": 5, "L": 2, "btn": 16},
    ]
    res = [
        {"class": STEM, "in": 3, "out": 16, "s": 2, "k": 3},
        {"class": K1KX, "in": 16, "out": 24, "s": 1, "k": 3, "L": 2, "btn": 8},
        {"class": K1KX, "in": 24, "out": 32, "s": 2, "k": 5, "L": 1, "btn": 8},
        {"class": K1KX, "in": 32, "out": 48, "s": 2, "k": 3, "L": 2, "btn": 16},
        {"class": K1KX, "in": 48, "out": 48, "s": 2, "k": 3, "L": 1, "btn": 16},
        {"class": K1KX, "in": 48, "out": 66, "s": 2, "k": 3, "L": 3, "btn": 16},
    ]
    for structure in (csp, res):
        for r, focus, deploy in ((66, True, True), (66, True, False), (65, False, True)):
            _assert_exact(structure, r, focus, deploy)


def test_layers_count_the_structures_main_path() -> None:
    """MAE-NAS's layer count: the stem plus two convs per residual unit (T: 19)."""
    for name, layers in (("t", 19), ("s", 25), ("m", 35)):
        an, genome = analyzer_for(resolve_structure(name))
        assert an.layers(genome) == layers
    net = PlainBackbone(tiny())
    assert analyzer_for(tiny(), 64)[0].layers(split(tiny())[1]) == sum(
        isinstance(x, torch.nn.Conv2d) for x in net.modules()
    ) - sum(u.proj is not None for blk in net.blocks[1:] for u in blk)


def test_odd_resolution_with_focus_is_an_error() -> None:
    with pytest.raises(DamoError, match="odd"):
        analyzer_for(resolve_structure("t"), 321, True)


# ------------------------------------------------------------------------ search
@pytest.fixture(scope="module")
def t_budget() -> Budgets:
    an, g = analyzer_for(resolve_structure("t"), 640, True)
    return Budgets(layers=20, flops=an.metrics(g).flops, params=2_500_000)


def _search(budgets: Budgets, iterations: int, seed: int = 0, **kw) -> Search:
    space = SearchSpace("k1kx", kernels=(3, 5))
    return Search(
        resolve_structure("init"),
        space,
        budgets,
        SearchConfig(population=64, iterations=iterations, seed=seed, **kw),
    )


def test_search_respects_budgets_and_improves(t_budget: Budgets) -> None:
    search = _search(t_budget, 6000)
    res = search.run()
    assert res.rejected_budget > 0  # the budget did bind
    for member in res.population:
        m = search.analyzer.metrics(member.genome)
        assert not t_budget.violations(m)
        assert m.layers <= 20 and m.flops <= t_budget.flops and m.params <= 2_500_000
        parse_structure(join(search.analyzer.bp, member.genome))  # valid structure
    scores = [m.score for m in res.population]
    assert scores == sorted(scores, reverse=True)
    assert len({m.genome for m in res.population}) == len(res.population)
    assert res.best.score > res.init.score


def test_search_every_candidate_within_space_rules() -> None:
    space = SearchSpace("k1kx", kernels=(3, 5))
    an, g = space.bind(resolve_structure("init"), budget_layers=20)
    rng = random.Random(1)
    for _ in range(3000):
        g = space.mutate(g, rng)
        st = parse_structure(join(an.bp, g))
        assert st[0]["out"] <= 32
        for i, b in enumerate(st[1:], 1):
            assert b["k"] in (3, 5) and 1 <= b["L"] and b["btn"] >= round8(b["out"] / 10)
            assert b["out"] >= b["in"]
            r = space.channel_ranges[i] if i < len(space.channel_ranges) else None
            if r:
                assert r[0] <= b["out"] <= r[1]
        assert st[1]["L"] <= 2


def test_search_reproducible_and_resumable(tmp_path: Path, t_budget: Budgets) -> None:
    a = _search(t_budget, 3000, seed=7).run()
    b = _search(t_budget, 3000, seed=7).run()
    assert [m.genome for m in a.population] == [m.genome for m in b.population]
    c = _search(t_budget, 3000, seed=8).run()
    assert [m.genome for m in c.population] != [m.genome for m in a.population]
    # stop half-way, resume from the checkpoint: same result as the uninterrupted run
    _search(t_budget, 1500, seed=7).run(outdir=tmp_path)
    resumed = _search(t_budget, 3000, seed=7).run(
        outdir=tmp_path, resume=tmp_path / "checkpoint.json"
    )
    assert [m.genome for m in resumed.population] == [m.genome for m in a.population]
    assert resumed.iterations == 3000
    # a checkpoint of another setup is refused
    with pytest.raises(DamoError, match="different search"):
        _search(t_budget, 3000, seed=9).run(resume=tmp_path / "checkpoint.json")


def test_initial_structure_over_budget_is_an_error() -> None:
    with pytest.raises(DamoError, match="over budget"):
        _search(Budgets(flops=1_000_000), 10)
    with pytest.raises(DamoError, match="latency table"):
        _search(Budgets(latency_ms=1.0), 10)


def test_searched_structure_builds_and_runs(t_budget: Budgets) -> None:
    res = _search(t_budget, 2000).run()
    st = parse_structure(dumps_text(res.structure))
    outs = PlainBackbone(st).eval()(torch.randn(1, 3, 128, 128))
    assert [o.shape[1] for o in outs] == [b["out"] for b in st[-3:]]
    assert [o.shape[-1] for o in outs] == [8, 8, 4]
    assert all(torch.isfinite(o).all() for o in outs)


def test_entropy_search_small(t_budget: Budgets) -> None:
    search = _search(
        t_budget,
        6,
        score="entropy",
        entropy_resolution=64,
        entropy_batch=2,
        entropy_repeats=1,
        workers=0,
        batch=3,
    )
    res = search.run()
    assert res.evaluated >= 1 and res.best.score >= res.init.score


# ------------------------------------------------------------------------ latency
def test_latency_table_prediction_and_files(tmp_path: Path) -> None:
    st = tiny()
    an, g = analyzer_for(st, 64, True)
    ops = an.ops(g)
    entries = {op[:5]: 0.1 * (i + 1) for i, op in enumerate(ops)}
    table = LatencyTable("torch", "CPU", 1, 0.05, entries)
    want = 0.05 + sum(0.1 * (i + 1) * op[6] for i, op in enumerate(ops))
    assert table.predict_ops(ops) == (pytest.approx(want), 0)
    # a missing conv is estimated from its nearest neighbour, scaled by MACs
    cin, cout, k, s, h = ops[1][:5]
    est, missing = table.predict_ops([(cin * 2, cout, k, s, h, (h - 1) // s + 1, 1)])
    assert missing == 1 and est == pytest.approx(0.05 + 2 * entries[ops[1][:5]])
    path = table.save(tmp_path / "lat.json")
    again = LatencyTable.load(path)
    assert again.entries == pytest.approx(table.entries) and again.predict(an, g) == pytest.approx(
        want
    )
    (tmp_path / "bad.json").write_text('{"format": "nope"}')
    with pytest.raises(DamoError, match="not a latency table"):
        LatencyTable.load(tmp_path / "bad.json")


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_profile_measures_real_ops(backend: str) -> None:
    keys = [(8, 16, 3, 1, 16), (16, 16, 1, 1, 16)]
    table = profile(keys, backend=backend, threads=1, repeats=3, warmup=1)
    assert set(table.entries) == set(keys)
    assert all(v >= 0 for v in table.entries.values()) and table.overhead_ms > 0


def test_fit_calibration_recovers_known_coefficients() -> None:
    rng = random.Random(0)
    sums = [rng.uniform(5, 80) for _ in range(8)]
    convs = [rng.randint(10, 60) for _ in range(8)]
    measured = [1.7 * t + 0.08 * n + 3.0 for t, n in zip(sums, convs)]
    assert fit_calibration(sums, convs, measured) == pytest.approx((1.7, 0.08, 3.0), rel=1e-9)
    # data an unconstrained fit explains with a negative offset: the cost stays >= 0, and
    # the fit is then the best one without it (here: scale and per-conv cost only)
    measured = [2.0 * t + 0.1 * n - 1.0 for t, n in zip(sums, convs)]
    scale, per_conv, offset = fit_calibration(sums, convs, measured)
    assert offset == 0.0 and scale > 0 and per_conv >= 0
    with pytest.raises(DamoError, match="at least 3"):
        fit_calibration(sums[:2], convs[:2], measured[:2])


def test_calibrated_table_predicts_with_coefficients_and_roundtrips(tmp_path: Path) -> None:
    an, g = analyzer_for(tiny(), 64, True)
    ops = an.ops(g)
    table = LatencyTable("torch", "CPU", 1, 0.05, {op[:5]: 0.1 for op in ops})
    raw, convs, _ = table.table_sum(ops)
    assert convs == sum(op[6] for op in ops) and raw == pytest.approx(0.1 * convs)
    table.calibration = Calibration(1.5, 0.02, 0.3, structures=5)
    assert table.predict(an, g) == pytest.approx(1.5 * raw + 0.02 * convs + 0.3)
    assert table.predict_uncalibrated(an, g) == pytest.approx(0.05 + raw)
    again = LatencyTable.load(table.save(tmp_path / "lat.json"))
    assert again.calibration == table.calibration
    assert again.predict(an, g) == pytest.approx(table.predict(an, g))
    data = json.loads((tmp_path / "lat.json").read_text())
    data["calibration"]["offset_ms"] = -1
    (tmp_path / "neg.json").write_text(json.dumps(data))
    with pytest.raises(DamoError, match="offset_ms"):
        LatencyTable.load(tmp_path / "neg.json")


def test_profile_calibrate_predict_smoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``nas profile --calibrate`` on a tiny space (torch backend), then ``nas score`` uses it."""
    from damo_plugins.cli import main

    st = tmp_path / "tiny.json"
    st.write_text(json.dumps(tiny()))
    out = tmp_path / "lat.json"
    common = ["--resolution", "32", "--init", str(st)]
    argv = ["nas", "profile", "--backend", "torch", "--threads", "1", "--samples", "2"]
    assert main([*argv, "--calibrate", "3", "--repeats", "3", *common, "-o", str(out)]) == 0
    table = LatencyTable.load(out)
    cal = table.calibration
    assert (
        cal is not None and cal.structures == 3 and len(table.meta["calibration_measured_ms"]) == 3
    )
    assert min(cal.scale, cal.per_conv_ms, cal.offset_ms) >= 0 and cal.mean_rel_error is not None
    capsys.readouterr()
    score = ["nas", "score", str(st), "--json", "--alpha", "1,1,1", "--latency-table", str(out)]
    assert main([*score, "--resolution", "32"]) == 0
    an, g = analyzer_for(tiny(), 32, True)
    raw, convs, _ = table.table_sum(an.ops(g))
    got = json.loads(capsys.readouterr().out)["latency_ms"]
    assert got == pytest.approx(cal.scale * raw + cal.per_conv_ms * convs + cal.offset_ms)
    with pytest.raises(SystemExit):  # argparse: 2 backbones are too few to fit 3 coefficients
        main([*argv, "--calibrate", "2", *common, "-o", str(out)])
    assert "at least 3 backbones" in capsys.readouterr().err


def test_measure_backbones_openvino_times_the_builder_backbone() -> None:
    ms = measure_backbones([tiny(), tiny(KXKX)], 32, backend="openvino", threads=1, repeats=3)
    assert len(ms) == 2 and all(0 < m < 1000 for m in ms)


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


@pytest.mark.parametrize("kind", ["k1kx", "kxkx"])
def test_searched_structure_builds_a_detector(tmp_path: Path, kind: str) -> None:
    """The search's output file feeds the model builders (``damo-yolo`` with ``backbone=FILE``)."""
    from damo_plugins.core.manager import get_manager
    from damo_plugins.models.structure import dumps_json

    an, g = analyzer_for(resolve_structure("m" if kind == "kxkx" else "t"), 640, True)
    budgets = Budgets(layers=an.layers(g), flops=an.metrics(g).flops)
    space = SearchSpace(kind, kernels=(3, 5))
    res = Search(
        resolve_structure("init"), space, budgets, SearchConfig(population=32, iterations=1500)
    ).run()
    path = tmp_path / "best.json"
    path.write_text(dumps_json(res.structure))
    model = get_manager().get_model_builder("damo-yolo")(backbone=str(path)).eval()
    with torch.no_grad():
        scores, boxes = model(torch.randn(1, 3, 128, 128))
    assert scores.shape[:2] == boxes.shape[:2] == (1, 16 * 16 + 8 * 8 + 4 * 4)
    assert torch.isfinite(scores).all() and torch.isfinite(boxes).all()
