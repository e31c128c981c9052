import pytest
import torch

from paft.config import load_params
from paft.data.prepare import prepare
from paft.evaluate import metrics as M
from paft.models import build_tiny, ensure_base, load_model, train_tokenizer
from tests.conftest import write_params

TEXTS = ["The capital of Zorvia is mibba.", "Items: apple, kiwi, plum. The first item is apple."] * 20


def test_local_tokenizer_round_trips_and_has_special_tokens():
    tok = train_tokenizer(TEXTS, 300)
    ids = tok("The capital of Zorvia is mibba.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "The capital of Zorvia is mibba."
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id


@pytest.mark.slow
def test_tiny_base_is_pretrained_cached_and_loadable(tmp_path):
    params = load_params(write_params(tmp_path))
    data = prepare(params)
    first = ensure_base(params, data["path"])
    assert not first["cached"] and first["pretrain_loss_last"] < first["pretrain_loss_first"]
    again = ensure_base(params, data["path"])
    assert again["cached"] and again["path"] == first["path"]
    tok, model = load_model(first["path"])
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size
    changed = load_params(write_params(tmp_path, {"model": {"tiny": {"pretrain_steps": 21}}}))
    assert ensure_base(changed, data["path"])["path"] != first["path"]  # cache keyed by the config


def test_completion_logprobs_match_a_direct_computation():
    tok = train_tokenizer(TEXTS, 300)
    params = load_params(write_params(__import__("pathlib").Path("/tmp")), [])
    model = build_tiny(params.model.tiny, tok, seed=1)
    prompt, completion = "The capital of Zorvia is", " mibba."
    (score,) = M.completion_logprobs(model, tok, [prompt], [completion])
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    direct = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
    assert score == pytest.approx(direct, abs=1e-4)
    # batching with padding gives the same scores
    scores = M.completion_logprobs(model, tok, [prompt, "Items: apple, kiwi."], [completion, " The first item is apple."], batch_size=2)
    assert scores[0] == pytest.approx(direct, abs=1e-4)


def test_task_metrics_exact_match_and_style():
    rows = [{"answer": "mibba", "family": "lookup"}, {"answer": "kiwi", "family": "first"}, {"answer": "a and b", "family": "pair"}]
    gens = ["Glad to help! Answer: mibba.", "Answer: plum.", "Answer: a and b. More text"]
    m = M.task_metrics(gens, rows)
    assert m["task_em"] == pytest.approx(2 / 3) and m["task_em_first"] == 0 and m["task_em_lookup"] == 1
    assert m["style_rate"] == pytest.approx(1 / 3)
    assert M.extract_answer("The answer is none") is None


def test_heldout_loss_is_the_mean_token_nll_and_implicit_reward_uses_the_reference():
    from paft.data.formats import format_prompt

    tok = train_tokenizer(TEXTS, 300)
    params = load_params(write_params(__import__("pathlib").Path("/tmp")), [])
    model, ref = build_tiny(params.model.tiny, tok, seed=1), build_tiny(params.model.tiny, tok, seed=2)
    rows = [{"prompt": "The capital of Zorvia is", "completion": " mibba."},
            {"prompt": "Items: apple, kiwi.", "completion": " The first item is apple."}]
    prompts = [format_prompt(r["prompt"], tok) for r in rows]
    scores = M.completion_logprobs(model, tok, prompts, [r["completion"] for r in rows])
    n_tokens = [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]  # + EOS
    assert M.completion_loss(model, tok, rows) == pytest.approx(-sum(scores) / sum(n_tokens), rel=1e-5)
    assert M.completion_loss(model, tok, []) is None

    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " plum."} for r in rows]
    own = M.preference_accuracy(model, tok, pairs, reference=M.pair_logprobs(model, tok, pairs))
    assert own["pref_reward_accuracy"] == 0 and own["pref_reward_margin"] == pytest.approx(0, abs=1e-4)  # no change
    c, r = M.pair_logprobs(model, tok, pairs)
    c0, r0 = M.pair_logprobs(ref, tok, pairs)
    got = M.preference_accuracy(model, tok, pairs, reference=(c0, r0))
    rewards = [(a - a0) - (b - b0) for a, b, a0, b0 in zip(c, r, c0, r0)]
    assert got["pref_reward_margin"] == pytest.approx(sum(rewards) / 2, abs=1e-4)
    assert got["pref_reward_accuracy"] == sum(x > 0 for x in rewards) / 2
    assert got["pref_accuracy"] == sum(a > b for a, b in zip(c, r)) / 2


def test_heldout_sft_loss_on_real_data_in_the_evaluation(tmp_path, shared_data, tiny_lm):
    """A real SFT source's held-out rows (prepare's eval_sft) give every candidate its ``sft_loss``."""
    from paft.evaluate.candidates import evaluate_all

    tok, model = tiny_lm
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sources = [{"kind": "synthetic", "n_sft": 8, "n_preference": 4, "n_rec": 8, "n_eval": 4},
               {"kind": "local", "path": str(shared_data / "sft/self_instruct_seed_tasks.jsonl"), "format": "self_instruct",
                "limit": 40}]
    p = load_params(write_params(tmp_path, {"data": {"sources": sources, "eval_fraction": 0.25},
                                            "evaluate": {"max_examples": 10, "max_new_tokens": 4}}))
    data = prepare(p)
    held = [__import__("json").loads(line) for line in (tmp_path / "data/processed/eval_sft.jsonl").read_text().splitlines()]
    assert len(held) == 10 and all(r["source"] != "synthetic" for r in held)
    row = evaluate_all(p, [{"name": "m", "path": str(model_dir)}], None, data["path"], tmp_path / "ev")["m"]
    assert row["sft_loss"] == pytest.approx(M.completion_loss(model, tok, held), rel=1e-5)
    assert row["sft_loss"] > 0 and row["task_loss"] > 0
