"""Merge recipes (mergekit YAML), the CLI's two forms and the model card."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from paft.cli import main
from paft.errors import ConfigError, PaftError
from paft.merge import MergeInput, merge_models
from paft.merge.card import file_hashes, input_hashes, model_card
from paft.merge.recipe import Recipe, RecipeInput, load_recipe, run_recipe
from tests.test_merge import adapters, base_dir, weights_of  # noqa: F401 (module fixtures: tiny Llama + 2 LoRAs)


def write(folder: Path, text: str, name: str = "recipe.yml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_recipe_flags_and_engine_merge_the_same(base_dir, adapters, tmp_path):
    sft, dpo = (str(a) for a, _ in adapters.values())
    recipe = write(tmp_path, f"""
        merge_method: ties
        base_model: {base_dir}
        models:
          - model: {sft}
            parameters: {{weight: 1.0, density: 0.3}}
          - model: {dpo}
            parameters: {{weight: 0.5}}
        parameters: {{lambda: 0.8, consensus_method: count, density: 0.3}}
    """)
    assert main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "r")]) == 0
    assert main(["merge", str(base_dir), sft, dpo, "--weights", "1", "0.5", "--density", "0.3", "--lambda", "0.8",
                 "--sign", "frequency", "--out", str(tmp_path / "f")]) == 0
    merge_models(base_dir, [MergeInput(sft, 1.0, 0.3), MergeInput(dpo, 0.5, 0.3)], "ties", tmp_path / "e",
                 lambda_=0.8, sign="frequency", tie_break="index")
    assert_same_weights(tmp_path / "r", tmp_path / "f")
    assert_same_weights(tmp_path / "r", tmp_path / "e")
    assert not torch.equal(weights_of(tmp_path / "r")["model.layers.0.mlp.up_proj.weight"],
                           weights_of(base_dir)["model.layers.0.mlp.up_proj.weight"])


def test_global_defaults_and_per_model_overrides(tmp_path):
    r = load_recipe(write(tmp_path, """
        merge_method: dare_ties
        base_model: base
        models:
          - base              # mergekit lists the base too: no input of a task-vector method
          - a
          - model: b
            parameters: {density: 0.9}
          - model: base+c     # mergekit's LoRA-on-a-model syntax, on the base: the adapter c
            parameters: {weight: 2}
        parameters: {weight: 0.5, density: 0.2, int8_mask: true, normalize: false}
        dtype: torch.float32
        random_seed: 4
    """))
    assert [(i.path, i.weight, i.density) for i in r.inputs] == [("a", 0.5, 0.2), ("b", 0.5, 0.9), ("c", 2.0, 0.2)]
    assert (r.method, r.base, r.delta_dtype, r.seed, r.normalize, r.rescale) == (
        "dare_ties", "base", "float32", 4, False, None)
    assert (r.tie_break, r.rescale_norm, r.sign, r.lambda_) == ("index", "l1", None, 1.0)  # defaults
    # linear averages a listed base in, as mergekit does (a zero delta with its weight)
    lin = load_recipe(write(tmp_path, "merge_method: linear\nbase_model: base\nmodels: [base, a]\n", "lin.yml"))
    assert [i.path for i in lin.inputs] == ["base", "a"]


def test_to_yaml_round_trips_and_flags_print_it(tmp_path, capsys):
    r = Recipe(method="dare_linear", base="/m/base", lambda_=1.5, normalize=True, rescale=False,
               inputs=[RecipeInput(path="/m/a", weight=0.7, density=0.4), {"path": Path("rel/b")}],
               rescale_norm="density", sign="count", tie_break="sort", delta_dtype="bfloat16", seed=7,
               adapter_rank=8, threads=2)
    text = r.to_yaml()
    assert load_recipe(write(tmp_path, text)) == r
    doc = yaml.safe_load(text)  # mergekit's names
    assert doc["parameters"] == {"lambda": 1.5, "normalize": True, "rescale": False, "consensus_method": "count"}
    assert (doc["dtype"], doc["random_seed"], doc["models"][1]) == (
        "bfloat16", 7, {"model": "rel/b", "parameters": {"weight": 1.0, "density": 1.0}})
    mergekit = pytest.importorskip("mergekit.config").MergeConfiguration.model_validate(doc)  # mergekit reads it too
    assert (mergekit.merge_method, str(mergekit.models[1].model), mergekit.dtype) == ("dare_linear", "rel/b", "bfloat16")
    plain = Recipe(method="ties", base="b", inputs=[{"path": "a"}])
    assert load_recipe(write(tmp_path, plain.to_yaml(), "plain.yml")) == plain
    assert not {"adapter_rank", "threads", "allow_vocab_mismatch", "ignore_adapter_base"} & set(plain.merge_kwargs())
    assert r.merge_kwargs()["adapter_rank"] == 8

    assert main(["merge", "/m/base", "/m/a", "rel/b", "--method", "dare_linear", "--weights", "0.7", "1",
                 "--print-recipe"]) == 0
    printed = load_recipe(write(tmp_path, capsys.readouterr().out, "printed.yml"))
    assert [(i.path, i.weight) for i in printed.inputs] == [("/m/a", 0.7), ("rel/b", 1.0)]
    assert printed.method == "dare_linear" and not (tmp_path / "out").exists()


def test_sign_names(tmp_path):
    head = "merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: "
    count = load_recipe(write(tmp_path, head + "{consensus_method: count}\n", "c.yml"))
    frequency = load_recipe(write(tmp_path, head + "{majority_sign_method: frequency}\n", "f.yml"))
    assert count == frequency and count.merge_kwargs()["sign"] == "frequency"
    assert load_recipe(write(tmp_path, head + "{consensus_method: sum}\n", "s.yml")).sign == "total"
    with pytest.raises(ConfigError, match=r"parameters\.majority_sign_method: total conflicts"):
        load_recipe(write(tmp_path, head + "{consensus_method: count, majority_sign_method: total}\n", "x.yml"))


@pytest.mark.parametrize("body,match", [
    ("models:\n  - a\n  - model: b\n    parameters: {densty: 0.2}\n",
     r"recipe\.yml:6: models\[1\]\.parameters\.densty: unknown key"),
    ("models:\n  - model: a\n    parameters: {density: 1.5}\n",
     r"recipe\.yml:5: models\[0\]\.parameters\.density: .*less than or equal to 1 \(got 1\.5\)"),
    ("models: [a]\nparameters: {weight: .inf}\n", r"recipe\.yml:4: parameters\.weight: .*finite"),
    ("models: [a]\nparameters: {weight: [0, 1]}\n", r"recipe\.yml:4: parameters\.weight: per-tensor gradients"),
    ("models: [a]\nmerge_method: slerp\n", r"recipe\.yml:\d: merge_method: unknown merge method 'slerp'"),
    ("models: [a, b\n", r"recipe\.yml:\d+: invalid YAML"),
    ("slices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n", r"recipe\.yml:3: slices: layer slicing"),
    ("models: [a]\ntokenizer_source: union\n", r"recipe\.yml:4: tokenizer_source: only base"),
    ("models: [a]\nout_dtype: float16\n", r"recipe\.yml:4: out_dtype: not supported"),
    ("models: [other+lora]\n", r"recipe\.yml:3: models\[0\]\.model: 'other\+lora': a LoRA applied to another"),
], ids=["unknown-key", "density", "weight-inf", "gradient", "method", "yaml", "slices", "tokenizer", "out_dtype",
        "lora-on-other"])
def test_bad_recipe_one_line_naming_file_and_key(base_dir, tmp_path, capsys, body, match):
    path = write(tmp_path, f"base_model: {base_dir}\n" + ("" if "merge_method" in body else "merge_method: ties\n") + body)
    with pytest.raises(ConfigError, match=match) as e:
        load_recipe(path)
    assert "\n" not in str(e.value)
    out = tmp_path / "out"
    assert main(["merge", "--recipe", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}:")
    assert not out.exists()


def test_cli_forms_are_exclusive_and_flags_are_checked(base_dir, adapters, tmp_path, capsys):
    sft = str(adapters["sft"][0])
    recipe = write(tmp_path, f"merge_method: ties\nbase_model: {base_dir}\nmodels: [{sft}]\n")
    out = ["--out", str(tmp_path / "out")]
    for argv in (["merge", str(base_dir), sft, "--recipe", str(recipe), *out],  # both forms
                 ["merge", "--recipe", str(recipe), "--density", "0.5", *out],
                 ["merge", str(base_dir), sft, "--density", "1.5", *out],
                 ["merge", str(base_dir), sft, "a", "--weights", "1", *out],  # 1 weight, 2 inputs
                 ["merge", str(base_dir), sft],  # no --out
                 ["merge", str(base_dir), *out],  # no input
                 ["merge", "--recipe", str(tmp_path / "missing.yml"), *out]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(PaftError, match=r"--density: .*less than or equal to 1"):
        Recipe.from_flags(base_dir, [sft], density=1.5)


def test_model_card_recipe_inputs_and_hashes(base_dir, adapters, tmp_path):
    sft = str(adapters["sft"][0])
    recipe = Recipe(method="ties", base=str(base_dir), inputs=[{"path": sft, "weight": 0.5, "density": 0.5}])
    summary = run_recipe(recipe, tmp_path / "m")
    hashes = input_hashes(base_dir, [sft])
    card = model_card(summary, recipe.to_yaml(), hashes)

    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"base_model": str(base_dir), "library_name": "transformers", "tags": ["merge", "paft", "ties"]}
    assert "**ties**" in card and summary["reference"] in card
    assert f"| `{sft}` | lora | 0.5 | 0.5 | 50.0% |" in card  # a LoRA delta is dense: density 0.5 keeps half
    block = card.split("```yaml\n")[1].split("```")[0]
    assert load_recipe(write(tmp_path, block)) == recipe  # the card's recipe re-runs the merge

    assert set(hashes) == {str(base_dir), sft}
    assert set(hashes[str(base_dir)]) == {"config.json", "model.safetensors"}
    assert set(hashes[sft]) == {"adapter_config.json", "adapter_model.safetensors"}
    for folder, files in hashes.items():
        assert files == file_hashes(folder)
        for name, digest in files.items():
            assert digest == hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()
            assert f"| `{name}` | `{digest}` |" in card


def test_hashes_are_remembered_until_a_file_changes(tmp_path, monkeypatch):
    import os

    import paft.merge.card as card

    monkeypatch.setenv("PAFT_HASH_CACHE", str(tmp_path / "cache.json"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights v1")
    read = []
    real = card._sha256
    monkeypatch.setattr(card, "_sha256", lambda p: read.append(p.name) or real(p))
    first = file_hashes(folder)
    assert sorted(read) == ["config.json", "model.safetensors"]
    assert file_hashes(folder) == first and len(read) == 2  # remembered: nothing read again
    (folder / "model.safetensors").write_bytes(b"weights v2")
    os.utime(folder / "model.safetensors", ns=(1, 1))  # another mtime, whatever the clock's resolution
    second = file_hashes(folder)
    assert read[2:] == ["model.safetensors"]
    assert second["model.safetensors"] == hashlib.sha256(b"weights v2").hexdigest() != first["model.safetensors"]
