"""phi4flash inside transformers (phi4flash.hf): Auto classes, generate(), streamers, pipelines, peft LoRA.

Every comparison is against the project's own paths: ``load_model`` logits, the engine's greedy tokens
(``phi4flash.load("embedded").generate(..., temperature=0)``), ``ChatTokenizer.encode_chat`` ids.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

import phi4flash
import phi4flash.hf
from phi4flash import GenerationConfig
from phi4flash.hf import EMBEDDED, Phi4FlashHFCache, Phi4FlashHFConfig, Phi4FlashHFForCausalLM

# <|end|> and <|endoftext|>: the embedded checkpoint's own eos list, whatever ids its vocabulary gives them
STOPS = set(json.loads((Path(EMBEDDED) / "generation_config.json").read_text())["eos_token_id"])
ENDOFTEXT = json.loads((Path(EMBEDDED) / "config.json").read_text())["eos_token_id"]
QUESTIONS = ["What is 23 + 45?", "Solve 3x + 5 = 20", "What is 1234 - 567?", "What is 25% of 80?"]
MAX_NEW = 320


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _new_tokens(row: torch.Tensor, prompt_length: int) -> list[int]:
    """Generated ids up to (not including) the first stop token, padding dropped."""
    ids = row[prompt_length:].tolist()
    end = next((i for i, t in enumerate(ids) if t in STOPS), len(ids))
    return ids[:end]


@pytest.fixture(scope="module")
def model() -> Phi4FlashHFForCausalLM:
    return AutoModelForCausalLM.from_pretrained(EMBEDDED).eval()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(EMBEDDED)


@pytest.fixture(scope="module")
def engine():
    engine = phi4flash.load("embedded")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def engine_ids(engine) -> dict[str, list[int]]:
    greedy = GenerationConfig(temperature=0, max_new_tokens=MAX_NEW)
    return {q: engine.generate(_chat(q), greedy).token_ids for q in QUESTIONS}


def _prompt(tok, question: str) -> dict[str, torch.Tensor]:
    return tok.apply_chat_template(_chat(question), add_generation_prompt=True, return_dict=True,
                                   return_tensors="pt")


# -- the article's code --------------------------------------------------------------------------------

# The model card's sample loads with device_map="cuda"; on a machine without CUDA that device does not exist,
# so the demo below asks for the CPU there (the one change besides trust_remote_code and the model id).
DEVICE_MAP = "cuda" if torch.cuda.is_available() else "cpu"


class Phi4MiniFlashDemo:
    """The article's usage code for Phi-4-mini-flash-reasoning, as a class.

    The text of the article's ``Phi4MiniFlashDemo`` class could not be retrieved here, so this is a faithful
    reconstruction from Microsoft's model card sample (the same calls, arguments and sampling settings:
    ``AutoModelForCausalLM.from_pretrained(model_id, device_map="cuda", torch_dtype="auto",
    trust_remote_code=True)``, ``AutoTokenizer``, ``apply_chat_template(..., add_generation_prompt=True,
    return_dict=True, return_tensors="pt")``, ``generate(max_new_tokens=32768, temperature=0.6, top_p=0.95,
    do_sample=True)``, ``batch_decode`` of the new tokens), wrapped in a class. Changed: trust_remote_code
    removed, the model id passed in (the embedded model's folder in the test), device_map CPU-friendly
    (``DEVICE_MAP``).
    """

    def __init__(self, model_id: str = "microsoft/Phi-4-mini-flash-reasoning") -> None:
        torch.random.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_id,
            device_map=DEVICE_MAP,
            torch_dtype="auto",
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)

    def solve(self, question: str, max_new_tokens: int = 32768) -> str:
        messages = [{
            "role": "user",
            "content": question,
        }]
        inputs = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        outputs = self.model.generate(
            **inputs.to(self.model.device),
            max_new_tokens=max_new_tokens,
            temperature=0.6,
            top_p=0.95,
            do_sample=True,
        )
        outputs = self.tokenizer.batch_decode(outputs[:, inputs["input_ids"].shape[-1]:])
        return outputs[0]


def test_the_article_demo_runs_natively_and_answers() -> None:
    demo = Phi4MiniFlashDemo(EMBEDDED)
    assert isinstance(demo.model, Phi4FlashHFForCausalLM)
    for a, b in ((23, 45), (317, 285), (64, 29)):
        reply = demo.solve(f"What is {a} + {b}?", max_new_tokens=512)
        assert reply.startswith("<think>") and "</think>" in reply, reply
        assert f"\\boxed{{{a + b}}}" in reply.split("</think>")[-1], reply
        assert reply.endswith("<|end|>"), reply


# -- registration and loading --------------------------------------------------------------------------


def test_auto_classes_load_the_embedded_folder_natively_under_the_checkpoint_names(model) -> None:
    config = AutoConfig.from_pretrained(EMBEDDED)
    assert isinstance(config, Phi4FlashHFConfig)
    assert config.to_native() == phi4flash.Phi4FlashConfig.from_json(EMBEDDED)
    assert isinstance(model, Phi4FlashHFForCausalLM)
    with safe_open(Path(EMBEDDED) / "model.safetensors", framework="pt") as f:
        checkpoint = set(f.keys())  # noqa: SIM118
        for name, tensor in model.state_dict().items():
            if name != "lm_head.weight":  # tied to the embedding, not stored
                assert torch.equal(tensor, f.get_tensor(name)), name
    assert set(model.state_dict()) - {"lm_head.weight"} == checkpoint
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_quantized_checkpoint_is_refused_with_the_way_to_load_it(tmp_path: Path) -> None:
    config = json.loads((Path(EMBEDDED) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization": {"bits": 8, "group_size": 64}}))
    with pytest.raises(phi4flash.ConfigError, match="phi4flash.load"):
        AutoConfig.from_pretrained(tmp_path)


def test_from_config_initialises_like_the_native_model() -> None:
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EMBEDDED))
    mamba = model.model.layers[0].attn
    n = mamba.A_log.shape[1]
    assert torch.equal(mamba.A_log, torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(mamba.A_log))
    assert torch.equal(mamba.D, torch.ones_like(mamba.D))
    dt = torch.nn.functional.softplus(mamba.dt_proj.bias)
    assert bool(((dt > 0.9e-3) & (dt < 0.11)).all())  # Mamba's dt range, not a generic init
    assert model.model.layers[1].attn.inner_cross_attn.lambda_q1.std() > 0.05


def test_bfloat16_keeps_a_log_and_the_lambdas_in_float32() -> None:
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.bfloat16)
    for name, param in model.named_parameters():
        kept = name.rsplit(".", 1)[-1] in ("A_log", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
        assert param.dtype == (torch.float32 if kept else torch.bfloat16), name


def test_logits_equal_load_model(model, tok) -> None:
    native = phi4flash.load_model("embedded")
    for question in QUESTIONS:
        ids = _prompt(tok, question)["input_ids"]
        with torch.no_grad():
            expected = native(ids)
            assert torch.equal(model(ids, use_cache=False).logits, expected)
            cached = model(ids).logits  # through a Phi4FlashHFCache, as generate() runs it
        torch.testing.assert_close(cached, expected, rtol=0, atol=1e-4)


def test_chat_template_gives_chat_tokenizer_ids(tok, tmp_path: Path) -> None:
    reference = phi4flash.ChatTokenizer.from_pretrained(EMBEDDED)
    conversations = [
        _chat("What is 123 + 4567?"),
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Solve 2x - 4 = 10"}],
        [{"role": "user", "content": "What is 7 * 8?"}, {"role": "assistant", "content": "\\boxed{56}"},
         {"role": "user", "content": "And 7 * 9?"}],
    ]
    # The official tokenizer_config.json names GPT2Tokenizer, which transformers 5 would rebuild with GPT-2's
    # split; the registration must load tokenizer.json as it is whatever the class says.
    official_style = tmp_path / "gpt2-class"
    shutil.copytree(EMBEDDED, official_style, ignore=shutil.ignore_patterns("*.safetensors", "*.png"))
    config_file = official_style / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
    for tokenizer in (tok, AutoTokenizer.from_pretrained(official_style)):
        for messages in conversations:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            assert ids == reference.encode_chat(messages)
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            assert text == reference.apply_chat_template(messages)


def test_trust_remote_code_still_loads_the_native_model_and_says_so(caplog) -> None:
    # The embedded config.json carries the official auto_map, and the folder has no .py file: had
    # transformers gone for the remote code, this would fail looking for configuration_phi4flash.py.
    assert "auto_map" in json.loads((Path(EMBEDDED) / "config.json").read_text())
    with caplog.at_level("WARNING", logger="phi4flash.hf"):
        model = AutoModelForCausalLM.from_pretrained(EMBEDDED, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(EMBEDDED, trust_remote_code=True)
    assert isinstance(model, Phi4FlashHFForCausalLM)
    assert tokenizer.apply_chat_template(_chat("Hi"), add_generation_prompt=True, return_dict=False)
    notes = [r.getMessage() for r in caplog.records if r.name == "phi4flash.hf"]
    assert len(notes) == 1
    assert "native model" in notes[0] and "Drop trust_remote_code=True" in notes[0]


def test_without_the_import_trust_remote_code_goes_to_the_auto_map() -> None:
    code = ("from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({EMBEDDED!r}, trust_remote_code=True)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "configuration_phi4flash.py" in result.stderr, result.stderr[-2000:]


def test_the_core_and_the_bench_need_no_transformers() -> None:
    code = """
import sys
sys.modules["transformers"] = None  # import transformers -> ImportError, as without the [hf] extra
import torch, phi4flash, phi4flash.bench
engine = phi4flash.load("embedded")
done = engine.generate([{"role": "user", "content": "What is 2 + 3?"}], phi4flash.GenerationConfig(temperature=0))
engine.close()
print(done.finish_reason)
for attempt in (lambda: __import__("phi4flash.hf"), lambda: phi4flash.bench.baseline_model(64, 2, 100, torch.float32)):
    try:
        attempt()
    except ImportError as err:
        print(err)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "stop"
    assert len(lines) == 3 and all("phi4flash[hf]" in line for line in lines[1:]), lines


# -- generate() ------------------------------------------------------------------------------------


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_generate_equals_the_engine(model, tok, engine_ids, question: str) -> None:
    inputs = _prompt(tok, question)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert _new_tokens(out[0], inputs["input_ids"].shape[1]) == engine_ids[question]
    assert out[0, -1].item() in STOPS  # stopped on the checkpoint's eos list, not the length


@pytest.mark.gpu
def test_on_cuda_greedy_generate_equals_the_engine_on_cuda(tok) -> None:
    cuda_model = AutoModelForCausalLM.from_pretrained(EMBEDDED, device_map="cuda", torch_dtype="auto")
    assert cuda_model.device.type == "cuda"
    engine = phi4flash.load("embedded", device="cuda", dtype="float32")
    try:
        for question in QUESTIONS:
            inputs = _prompt(tok, question).to("cuda")
            out = cuda_model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
            expected = engine.generate(_chat(question), GenerationConfig(temperature=0, max_new_tokens=MAX_NEW))
            assert _new_tokens(out[0].cpu(), inputs["input_ids"].shape[1]) == expected.token_ids, question
    finally:
        engine.close()


def test_batched_left_padded_greedy_equals_the_engine(model, engine_ids) -> None:
    tok = AutoTokenizer.from_pretrained(EMBEDDED, padding_side="left")
    texts = [tok.apply_chat_template(_chat(q), add_generation_prompt=True, tokenize=False) for q in QUESTIONS]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # really padded
    out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True,
                         output_scores=True)
    width = batch["input_ids"].shape[1]
    for row, question in enumerate(QUESTIONS):
        assert _new_tokens(out.sequences[row], width) == engine_ids[question], question
    assert len(out.scores) == out.sequences.shape[1] - width
    cache = out.cache
    assert isinstance(cache, Phi4FlashHFCache)
    # each row's own length: its real prompt, padding left out, plus every token fed after it (the last
    # generated one is never fed; finished rows are fed padding, as generate() does for any model)
    fed = out.sequences.shape[1] - width - 1
    assert cache.state.lengths.tolist() == (batch["attention_mask"].sum(1) + fed).tolist()
    assert cache.get_seq_length() == out.sequences.shape[1] - 1


def test_streamers_give_the_generated_text(model, tok, capsys) -> None:
    inputs = _prompt(tok, QUESTIONS[0])
    expected = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    text = tok.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=model.generate,
                              kwargs={**inputs, "max_new_tokens": MAX_NEW, "do_sample": False, "streamer": streamer})
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert len(pieces) > 3 and "".join(pieces) == text
    capsys.readouterr()
    model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                   streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    assert capsys.readouterr().out.strip() == text.strip()


def test_eos_token_id_list_stops_at_the_first_listed_token(model, tok, engine_ids) -> None:
    inputs = _prompt(tok, QUESTIONS[1])
    full = engine_ids[QUESTIONS[1]]
    marker = full[6]  # a token the greedy reply writes early
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=[marker, ENDOFTEXT])
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new == full[:full.index(marker) + 1]


def test_sampling(model, tok) -> None:
    inputs = _prompt(tok, QUESTIONS[2])
    greedy = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    top1 = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=True, top_k=1, temperature=0.6)
    assert torch.equal(top1, greedy)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=True, temperature=0.6, top_p=0.95,
                                   num_return_sequences=2))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[0] == 2


def test_beam_search_and_no_cache_agree_with_the_cache(model, tok) -> None:
    inputs = _prompt(tok, QUESTIONS[3])
    beams = {"num_beams": 4, "num_return_sequences": 4, "return_dict_in_generate": True, "output_scores": True}
    for options in ({}, beams):
        cached = model.generate(**inputs, max_new_tokens=60, do_sample=False, **options)
        uncached = model.generate(**inputs, max_new_tokens=60, do_sample=False, use_cache=False, **options)
        if options:  # every beam, and its score: the cache rows must follow their beams (reorder_cache)
            assert torch.equal(cached.sequences, uncached.sequences)
            torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=0, atol=1e-4)
        else:
            assert torch.equal(cached, uncached)


def test_prefill_runs_the_cross_decoder_on_the_last_token_only(model, tok) -> None:
    inputs = _prompt(tok, QUESTIONS[1])
    seen: dict[str, list[int]] = {"self": [], "cross": []}
    kv_layer = model.native_config.kv_layer
    hooks = [model.model.layers[kv_layer].register_forward_pre_hook(lambda m, a: seen["self"].append(a[0].shape[1])),
             model.model.layers[kv_layer + 1].register_forward_pre_hook(
                 lambda m, a: seen["cross"].append(a[0].shape[1]))]
    try:
        model.generate(**inputs, max_new_tokens=5, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    prompt = inputs["input_ids"].shape[1]
    assert seen["self"] == [prompt, 1, 1, 1, 1]  # the self-decoder reads the whole prompt
    assert seen["cross"] == [1, 1, 1, 1, 1]  # the cross-decoder only the last token of it


def test_a_returned_cache_continues_the_conversation(model, tok) -> None:
    first = _prompt(tok, "What is 23 + 45?")
    out = model.generate(**first, max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True)
    follow_up = tok("<|user|>What is 12 + 30?<|end|><|assistant|>", return_tensors="pt", add_special_tokens=False)
    ids = torch.cat([out.sequences, follow_up["input_ids"]], dim=1)
    mask = torch.ones_like(ids)
    seen = out.cache.get_seq_length()
    continued = model.generate(ids, attention_mask=mask, cache=out.cache, max_new_tokens=MAX_NEW, do_sample=False)
    fresh = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    assert torch.equal(continued, fresh)
    assert "\\boxed{42}" in tok.decode(continued[0, ids.shape[1]:])
    assert seen < ids.shape[1]  # only the turn's new tokens were prefilled


def test_bad_inputs_fail_clearly(model, tok) -> None:
    ids = _prompt(tok, "Hi")["input_ids"]
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=model.model.embed_tokens(ids))
    cache = Phi4FlashHFCache()
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="new Phi4FlashHFCache"):
        model(torch.cat([ids, ids]), cache=cache)
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(TypeError, match="Phi4FlashHFCache"):
        model(ids, cache=filled)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(1)


# -- pipeline and peft -----------------------------------------------------------------------------


def test_text_generation_pipeline_answers_chat_messages(tok, engine_ids) -> None:
    generator = pipeline("text-generation", model=EMBEDDED)
    for question in QUESTIONS[:2]:
        result = generator(_chat(question), max_new_tokens=MAX_NEW, do_sample=False)
        reply = result[0]["generated_text"][-1]
        assert reply["role"] == "assistant"
        assert reply["content"] == tok.decode(engine_ids[question], skip_special_tokens=True)


def test_lora_trains_saves_loads_and_merges_into_a_phi4flash_checkpoint(tok, tmp_path: Path) -> None:
    targets = ["Wqkv", "out_proj", "fc1", "fc2"]
    base = AutoModelForCausalLM.from_pretrained(EMBEDDED)
    projections = {n for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)}
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                      task_type="CAUSAL_LM"))
    wrapped = {n.removeprefix("base_model.model.") for n, m in tuned.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == projections and len(projections) == 28  # every attention, Mamba, GMU and MLP projection

    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in (
        ("What is the capital of France?", "Paris is the capital of France."),
        ("Name a primary color.", "Red is a primary color."),
        ("Which planet is the largest?", "Jupiter is the largest planet."))]
    tok = AutoTokenizer.from_pretrained(EMBEDDED, padding_side="right")
    batch = tok([tok.apply_chat_template(c, tokenize=False) for c in chats], return_tensors="pt", padding=True,
                add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=5e-3)
    tuned.train()
    losses = []
    for _ in range(10):
        loss = tuned(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses
    tuned.eval()

    adapter = tmp_path / "adapter"
    tuned.save_pretrained(adapter)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(EMBEDDED), adapter).eval()
    with torch.no_grad():
        expected = tuned(**batch, use_cache=False).logits
        assert torch.equal(reloaded(**batch, use_cache=False).logits, expected)

    merged = tuned.merge_and_unload()
    assert isinstance(merged, Phi4FlashHFForCausalLM)
    checkpoint = tmp_path / "merged"
    phi4flash.save_checkpoint(merged.to_native(), checkpoint)
    tok.save_pretrained(checkpoint)  # transformers 5 writes chat_template.jinja, which ChatTokenizer reads
    native = phi4flash.load_model(checkpoint)
    with torch.no_grad():
        got = native(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-4)
    assert not torch.equal(got, phi4flash.load_model("embedded")(batch["input_ids"], batch["attention_mask"]))
    merged.save_pretrained(tmp_path / "saved")  # transformers' own format: the same names, "dtype" in config.json
    saved = phi4flash.load_model(tmp_path / "saved")
    assert saved.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(saved(batch["input_ids"], batch["attention_mask"]), got)

    question = _chat("What is the capital of France?")
    inputs = tok.apply_chat_template(question, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = merged.generate(**inputs, max_new_tokens=40, do_sample=False)
    engine = phi4flash.load(str(checkpoint))
    try:
        done = engine.generate(question, GenerationConfig(temperature=0, max_new_tokens=40))
    finally:
        engine.close()
    assert done.token_ids == _new_tokens(out[0], inputs["input_ids"].shape[1])
