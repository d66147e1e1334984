"""knapspec-bench helpers without servers: workloads, grid, metrics parsing, table, greedy comparison."""

import pytest

from vllm_knapspec.tools import bench
from vllm_knapspec.tools import workloads as wl


@pytest.fixture(scope="module")
def tok(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def test_prompts_are_token_exact_and_alternate(tok):
    for length, count in ((512, 6), (2048, 2)):
        ps = wl.build_prompts(tok, length, count)
        assert [p.num_tokens for p in ps] == [length] * count
        assert [p.kind for p in ps] == ["code", "prose"] * (count // 2)
        assert len({p.token_ids for p in ps}) == count
    code = wl.build_prompts(tok, 512, 1)[0]
    assert tok.decode(code.token_ids).startswith(tok.decode(wl._ids(tok, wl.code_text("typing"))[:512]))
    prose = wl.build_prompts(tok, 512, 2)[1]
    text = tok.decode(prose.token_ids)
    assert "Summarize the following text:" in text and text.rstrip().endswith("assistant")


def test_same_document_at_every_context(tok):
    short, long = wl.build_prompts(tok, 512, 2), wl.build_prompts(tok, 2048, 2)
    assert long[0].token_ids[:512] == short[0].token_ids  # code: a prefix
    head, tail = wl.prose_template(tok)
    n = 512 - len(tail)
    assert long[1].token_ids[:n] == short[1].token_ids[:n]  # prose: all but the template tail


def test_calibration_prompts_are_not_benchmark_prompts(tok):
    cal = wl.calibration_prompts(tok, 512)
    bench_ids = {p.token_ids for p in wl.build_prompts(tok, 512, 16)}
    assert [p.kind for p in cal] == ["code", "prose"] and not bench_ids & {p.token_ids for p in cal}


def test_mixed_prompts_alternate_copy_and_free_prose(tok):
    ps = wl.build_mixed_prompts(tok, 512, 8)
    assert [p.kind for p in ps] == ["copy", "free"] * 4 and len({p.token_ids for p in ps}) == 8
    assert all(256 < p.num_tokens <= 512 for p in ps[::2]) and all(p.num_tokens < 100 for p in ps[1::2])
    text = tok.decode(ps[0].token_ids)
    assert wl.COPY_INSTRUCTIONS[0] in text and "```python\ndef " in text and text.rstrip().endswith("assistant")
    assert bench.parse_args(["--workload", "mixed"]).concurrency == [1, 4]


def test_plain_tokenizer_without_chat_template():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    p = wl.prose_prompt(Tok(), 0, 300)
    assert p.num_tokens == 300 and "".join(map(chr, p.token_ids)).startswith(wl.PROSE_INSTRUCTION)
    with pytest.raises(ValueError):
        wl.prose_prompt(Tok(), 0, 10)


def test_grid_and_requests():
    grid = bench.build_grid([512, 2048, 8192], [1, 4, 16], 8192)
    assert grid == [(512, 1), (512, 4), (512, 16), (2048, 1), (2048, 4), (8192, 1)]
    assert [bench.requests_per_cell(c, n, 4, 16384) for c, n in grid] == [4, 4, 16, 4, 4, 2]
    assert bench.effective_context(8192, 8192, 64) == 8128 and bench.effective_context(512, 8192, 64) == 512
    assert bench.parse_int_list("512, 2k,8K") == [512, 2048, 8192]
    assert bench.ctx_label(8192) == "8K" and bench.ctx_label(512) == "512"


def test_parse_metrics_sums_label_sets():
    text = (
        '# HELP x\nvllm:spec_decode_num_drafts_total{engine="0"} 3.0\n'
        'vllm:knapspec_skipped_attention{worker="1"} 4\nvllm:knapspec_skipped_attention{worker="2"} 1\n'
    )
    m = bench.parse_metrics(text)
    assert m["vllm:spec_decode_num_drafts_total"] == 3.0 and m["vllm:knapspec_skipped_attention"] == 5.0


def test_compare_greedy_reports_where_outputs_diverge():
    ref = {
        (512, 1, 0): {"token_ids": [1, 2, 3, 4], "text": "abcd"},
        (512, 1, 1): {"token_ids": [5, 6], "text": "ef"},
        (512, 4, 0): {"token_ids": [7], "text": "g"},
    }
    got = {(512, 1, 0): {"token_ids": [1, 2, 9, 4], "text": "abxd"}, (512, 1, 1): {"token_ids": [5, 6], "text": "ef"}}
    mm = bench.compare_greedy(ref, got, "knapspec")
    assert [(m["concurrency"], m["prompt"], m["token"]) for m in mm] == [(1, 0, 2), (4, 0, None)]
    assert "diverges at output token 2" in bench.format_mismatch(mm[0])
    assert bench.compare_greedy(ref, ref, "x") == []
    assert bench.first_diff([1, 2], [1, 2, 3]) == 2 and bench.first_diff([1], [1]) is None


def _cell(method, tok_s, mode="greedy", **kw):
    return {
        **dict(
            method=method,
            context=512,
            nominal_context=512,
            concurrency=1,
            mode=mode,
            tok_s=tok_s,
            acceptance_rate=None,
            mean_accepted_length=None,
            selection_share=0.0,
            gauges_end={},
            gauges_mean={},
        ),
        **kw,
    }


def test_table_speedup_and_skip_columns():
    cells = [
        _cell("plain", 10.0),
        _cell(
            "knapspec",
            12.0,
            acceptance_rate=0.8,
            mean_accepted_length=3.5,
            gauges_end={"skipped_attention": 4, "skipped_mlp": 1, "drafting_enabled": 1},
            greedy_equal=True,
            drafts=10,
            no_spec_steps=0,
            selections_total=1,
        ),
        _cell("static", 9.0, greedy_equal=False, drafts=5),
        _cell("clasp", 11.0, drafts=3, no_spec_steps=2),
        _cell("plain", 8.0, mode="sampled"),
        _cell("clasp", 8.0, mode="sampled", drafts=0, no_spec_steps=9, selections_total=0),
    ]
    bench.add_derived(cells, "a3,a5,m7", 8)
    assert [c["speedup"] for c in cells] == [1.0, 1.2, 0.9, 1.1, 1.0, 1.0]
    assert (cells[1]["skip_attn"], cells[1]["skip_mlp"]) == (4, 1)
    assert (cells[2]["skip_attn"], cells[2]["skip_mlp"]) == (2, 1) and cells[3]["skip_attn"] == 8
    table = bench.format_table(cells)
    lines = table.splitlines()
    assert lines[0] == bench.TABLE_HEADER and len(lines) == 2 + len(cells)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    row = next(line for line in lines if "| knapspec |" in line)
    assert "1.20x" in row and "4/1" in row and "| yes |" in row
    assert "**NO**" in next(line for line in lines if "| static |" in line)
    assert "2/1*" in table and "8/8*" in table and "| partly |" in table
    assert "no (no selection yet)" in next(line for line in lines if "| sampled | clasp |" in line)


def test_collapsed_sampled_acceptance_is_flagged():
    def c(method, mode, acc, drafted):
        return dict(method=method, mode=mode, accepted_tokens=acc, draft_tokens=drafted)

    ok = [c("ngram", "greedy", 50, 100), c("ngram", "sampled", 30, 100)]
    bad = [c("static", "greedy", 77, 82), c("static", "sampled", 1, 39)]
    assert bench.sampled_acceptance_warnings(ok) == []
    w = bench.sampled_acceptance_warnings(ok + bad)
    assert len(w) == 1 and w[0].startswith("static:")


def test_interleaved_rounds_and_paired_ratios():
    assert bench.rounds_of(4, 1) == [[0], [1], [2], [3]] and bench.rounds_of(16, 16) == [list(range(16))]
    assert bench.rounds_of(5, 2) == [[0, 1], [2, 3], [4]]
    plain = _cell("plain", 10.0, round_tok_s=[10.0, 8.0, 12.0, 10.0])
    ks = _cell("knapspec", 9.9, round_tok_s=[9.9, 8.4, 11.4, 9.5])
    ng = _cell("ngram", 15.0, round_tok_s=[15.0, 15.0])  # different rounds: not paired
    cells = [plain, ks, ng]
    bench.add_derived(cells, None, 8)
    assert ks["paired"] == {"median": 0.97, "min": 0.95, "max": 1.05, "n": 4}
    assert plain["paired"] is None and ng["paired"] is None
    assert ks["paired_vs"] == {"ngram": None}
    ng4 = _cell("ngram", 11.0, round_tok_s=[11.0, 8.0, 12.0, 9.5])
    assert bench.paired_between(ks, ng4) == {"median": 0.975, "min": 0.9, "max": 1.05, "n": 4}
    row = next(line for line in bench.format_table(cells).splitlines() if "| knapspec |" in line)
    assert "| 0.99x | 0.97x (0.95-1.05) |" in row
    check = bench.target_check(cells)
    assert check[0].startswith("- KnapSpec >= 0.98x of plain decoding in 1/1 cells")
    assert "paired per-round medians >= 0.98x in 0/1" in check[1]
    assert "ahead of every baseline in 0/1 cells (behind or level with: ngram" in check[2]


def test_round_order_is_a_fresh_permutation_per_round():
    live = ["plain", "knapspec", "static", "clasp", "ngram"]
    orders = [bench.round_order(live, t, 1234) for t in range(40)]
    assert all(sorted(o) == sorted(live) for o in orders)
    assert orders == [bench.round_order(live, t, 1234) for t in range(40)]  # seeded: reproducible
    before_plain = {o[o.index("plain") - 1] for o in orders if o[0] != "plain"}
    assert len(before_plain) >= 3  # plain does not always follow the same method
    assert len({o[0] for o in orders}) == len(live)  # every method goes first somewhere


def test_a_second_plain_server_is_the_control_not_a_peer():
    assert bench.method_specs(["plain", "plain2"], {"method": "knapspec"}, None, 8) == {"plain": None, "plain2": None}
    plain = _cell("plain", 10.0, round_tok_s=[10.0, 8.0])
    aa = _cell("plain2", 11.0, round_tok_s=[11.0, 8.0])
    ks = _cell("knapspec", 10.5, round_tok_s=[10.5, 8.0])
    cells = [plain, aa, ks]
    bench.add_derived(cells, None, 8)
    assert aa["paired"]["median"] == 1.05 and ks["paired_vs"] == {}  # the A/A spread; KnapSpec has no peer here
    assert not any("behind or level with: plain2" in line for line in bench.target_check(cells))


def test_gpu_servers_run_as_vllm_serve_does_there():
    cpu = bench.parse_args(["--methods", "plain,plain2,knapspec,ngram"])
    assert bench.server_placement(cpu) == ["--dtype", "float32", "--enforce-eager"]
    gpu = bench.parse_args(["--gpu", "--methods", "plain,plain2,knapspec,ngram"])
    # four servers up at once share the GPU; no float32, no eager: the model's dtype, compiled, CUDA graphs
    assert bench.server_placement(gpu) == ["--gpu-memory-utilization", "0.23"]
    assert bench.server_placement(bench.parse_args(["--gpu", "--sequential"])) == ["--gpu-memory-utilization", "0.9"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--gpu", "--gpu-memory-utilization", "1.5"])


def test_engine_mode_names_the_runner_and_the_scheduling():
    info = {"vllm_config": {"scheduler_config": {"async_scheduling": False}}}
    ngram_log = (
        "WARNING Async scheduling not supported with ngram-based speculative decoding and will be disabled.\n"
        "WARNING Model Runner V2 does not yet support ngram/ngram_gpu speculative decoding; using the V1 model "
        "runner instead."
    )
    assert bench.engine_mode(info, ngram_log) == {"runner": "V1", "scheduling": "sync"}
    info["vllm_config"]["scheduler_config"]["async_scheduling"] = True
    assert bench.engine_mode(info, "(Worker pid=7) INFO [gpu_worker.py:518] Using V2 Model Runner") == {
        "runner": "V2",
        "scheduling": "async",
    }
    assert bench.engine_mode({"vllm_config": "text form"}, "") == {"runner": None, "scheduling": None}


def test_more_requests_than_prompts_send_the_prompts_again():
    pool = ["code0", "prose0", "code1"]
    assert bench.cycled(pool, 2) == ["code0", "prose0"]
    assert bench.cycled(pool, 7) == pool + pool + ["code0"]
    # 16 rounds of 16 at 512 tokens: the 40 distinct prompts, each sent again, the first ones a third time
    reqs = bench.requests_per_cell(512, 16, 256, 1 << 20)
    assert reqs == 256 and bench.cycled(list(range(bench.DISTINCT_PROMPTS)), reqs)[-1] == 255 % 40
