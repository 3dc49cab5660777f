"""The value-head PRM backend (Skywork-o1-Open-PRM's layout) on a tiny random Qwen2 checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model, Qwen2Tokenizer

from arbitrage_common import config as C
from arbitrage_common import presets as P
from arbitrage_common.backends import value_head_prm as V
from arbitrage_common.backends.checkpoints import CheckpointError
from arbitrage_common.backends.scorers import load_step_scorer
from arbitrage_common.interfaces import ScoreItem

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = 32
# A byte-level Qwen2 tokenizer without merges: one token per byte, so encoding a joined text
# equals Skywork's step-by-step encoding, and the reference below can encode independently.
# (The bundled character tokenizer does not survive AutoTokenizer under a qwen2 config: it is
# rebuilt as a byte-level Qwen2Tokenizer, and "\n" is no longer in its vocabulary.)
BYTE_VOCAB = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
BOS = SPECIALS["<|endoftext|>"]
ITEMS = [
    ScoreItem("Start with 4. Add 3.", (), "4 + 3 = 7"),
    ScoreItem("Start with 4. Add 3. Double it.", (("4 + 3 = 7", "draft"),), "7 * 2 = 14"),
    ScoreItem("12 - 5?", (("First, 12 - 5\nis 7", "target"), ("so 7", "draft")), "Answer: 7\nDone."),
]


def _write_checkpoint(path: Path, *, head=True, shards=1) -> Path:
    """A checkpoint laid out as Skywork's: config naming Qwen2ForPrmModel (remote code not
    shipped: it must never be needed), bf16 weights ``model.*`` + ``lm_head.weight`` +
    ``v_head.summary.{weight,bias}``, a Qwen2 tokenizer with a BOS."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=260, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=SPECIALS["<|im_end|>"],
                         pad_token_id=BOS)
    state = {k: v.detach().to(torch.bfloat16).clone() for k, v in Qwen2ForCausalLM(config).state_dict().items()}
    if head:
        state[V.HEAD_WEIGHT] = torch.randn(1, HIDDEN).to(torch.bfloat16)
        state[V.HEAD_BIAS] = torch.tensor([0.75]).to(torch.bfloat16)  # a bias that matters
    path.mkdir(parents=True)
    config.save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data.pop("dtype", None)
    data.update(architectures=[V.ARCHITECTURE], torch_dtype="bfloat16",
                auto_map={"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                          "AutoModel": "modeling_qwen2_rm.Qwen2ForPrmModel"})
    (path / "config.json").write_text(json.dumps(data, indent=2))
    names = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:  # the head in the last shard, found through the index
        parts = [names[i::shards] for i in range(shards)]
        weight_map = {}
        for i, part in enumerate(parts):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(path / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
        (path / V.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    Qwen2Tokenizer(vocab={**BYTE_VOCAB, **SPECIALS}, merges=[], bos_token="<|endoftext|>",
                   eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "Skywork-o1-Open-PRM-Qwen-2.5-1.5B")


@pytest.fixture(scope="module")
def scorer(checkpoint):
    return load_step_scorer(checkpoint, threads=1)


def _reference(checkpoint: Path, items) -> list[float]:
    """Independently: the body forward on the whole text, then the head at the last token."""
    weights = {k: v.float() for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    body = Qwen2Model(Qwen2Config.from_pretrained(checkpoint)).float().eval()
    body.load_state_dict({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")})
    to_bytes = ByteLevel(add_prefix_space=False, use_regex=False)
    out = []
    for item in items:
        steps = "".join(line + "\n" for text in [*(t for t, _ in item.history), item.candidate]
                        for line in text.split("\n"))
        chars = "".join(piece for piece, _ in to_bytes.pre_tokenize_str(item.problem + "\n" + steps))
        ids = [BOS] + [BYTE_VOCAB[ch] for ch in chars]
        with torch.no_grad():
            hidden = body(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        out.append(torch.sigmoid(hidden @ weights[V.HEAD_WEIGHT][0] + weights[V.HEAD_BIAS][0]).item())
    return out


def test_detected_and_loaded_as_a_value_head_prm(checkpoint, scorer):
    assert V.is_value_head_prm(checkpoint) and V.value_head_problem(checkpoint) is None
    assert isinstance(scorer, V.ValueHeadPRMScorer) and scorer.annotate_history is False
    assert scorer.device.type == "cpu" or torch.cuda.is_available()
    with pytest.raises(ValueError, match="annotate_history"):
        load_step_scorer(checkpoint, annotate_history=True)
    with pytest.raises(ValueError, match="trust_remote_code"):  # Skywork's auto_map is never run
        load_step_scorer(checkpoint, trust_remote_code=True)
    for bundled in ("prm", "router", "target"):  # the other kinds keep their backends
        assert not V.is_value_head_prm(ROOT / "models" / bundled)


def test_input_is_skywork_layout(scorer):
    tok = scorer.tokenizer
    assert tok.bos_token_id == BOS and scorer.step_id == tok.encode("\n")[-1] == BYTE_VOCAB["Ċ"]
    item = ScoreItem("1+1", (("a", "draft"),), "b\nc\n")  # a raw draft's trailing newline is not a step
    b = {ch: BYTE_VOCAB[ch] for ch in "1+abc"}
    nl = scorer.step_id
    assert scorer.encode(item) == [BOS, b["1"], b["+"], b["1"], nl, b["a"], nl, b["b"], nl, b["c"], nl]
    # Skywork writes the BOS as text; we put its id: the same ids
    problem = "Start with 4. Add 3."
    assert scorer.encode(ScoreItem(problem, (), "x"))[:-2] == tok.encode(tok.bos_token + problem + "\n")


def test_scores_equal_a_direct_computation(checkpoint, scorer):
    single = [scorer.score_batch([item])[0] for item in ITEMS]
    assert all(0.0 <= s <= 1.0 for s in single)
    assert single == pytest.approx(_reference(checkpoint, ITEMS), abs=1e-5)
    assert len({round(s, 6) for s in single}) == len(single)  # not a constant


def test_padded_batch_equals_one_at_a_time(scorer):
    items = ITEMS + ITEMS[::-1]  # different lengths side by side, right-padded
    single = [scorer.score_batch([item])[0] for item in items]
    assert scorer.score_batch(items) == pytest.approx(single, abs=1e-5)
    assert scorer.score_batch([]) == []


def test_input_past_the_context_keeps_problem_candidate_and_newest_steps(scorer):
    """512 positions; one token per byte: BOS, problem + newline, each line + its step token."""
    def length(item):
        return 1 + len(item.problem) + 1 + sum(len(line) + 1 for text in [*(t for t, _ in item.history), item.candidate]
                                               for line in text.split("\n"))

    history = tuple((f"{i} + 1 = {i + 1}\nso {i + 1}", "draft") for i in range(60))
    item = ScoreItem("Start with 0. Add 1 sixty times.", history, "60 + 1 = 61")
    keep = max(k for k in range(len(history) + 1)
               if length(ScoreItem(item.problem, history[len(history) - k:], item.candidate)) <= 512)
    assert 0 < keep < len(history) and length(item) > 512
    expected = ScoreItem(item.problem, history[len(history) - keep:], item.candidate)
    assert scorer.fit(item) == expected
    assert len(scorer.encode(expected)) == length(expected) <= 512
    assert scorer.score_batch([item]) == scorer.score_batch([expected])


def test_sharded_checkpoint_found_through_its_index(checkpoint, scorer, tmp_path):
    sharded = _write_checkpoint(tmp_path / "sharded", shards=2)
    assert not (sharded / "model.safetensors").exists()
    assert V.is_value_head_prm(sharded) and V.value_head_problem(sharded) is None
    assert load_step_scorer(sharded, threads=1).score_batch(ITEMS) == pytest.approx(scorer.score_batch(ITEMS), abs=1e-6)


def _preset_cfg(tmp_path: Path, prm: Path) -> C.AppConfig:
    data = yaml.safe_load((P.PRESETS_DIR / "qwen-math-1.5b-7b.yaml").read_text())
    data["base_dir"] = str(tmp_path)
    for role, arch in (("draft", "Qwen2ForCausalLM"), ("target", "Qwen2ForCausalLM"),
                       ("router", "Qwen2ForSequenceClassification")):
        d = tmp_path / role
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": [arch], "id2label": {"0": "LABEL_0"}}))
        (d / "model.safetensors").write_bytes(b"")
        (d / "tokenizer.json").write_text("{}")
        data["pools"][role]["model"]["path"] = role
    data["pools"]["prm"]["model"]["path"] = str(prm)
    return C.AppConfig.model_validate(data)


def test_path_check_accepts_it_in_the_prm_pool(checkpoint, tmp_path):
    P.check_model_paths(_preset_cfg(tmp_path, checkpoint))


def test_a_checkpoint_without_the_head_fails_naming_the_path(tmp_path):
    headless = _write_checkpoint(tmp_path / "headless", head=False)
    assert V.is_value_head_prm(headless)  # it claims the architecture: never a silent random head
    with pytest.raises(CheckpointError) as info:
        load_step_scorer(headless)
    assert str(headless) in str(info.value) and V.HEAD_WEIGHT in str(info.value)
    [problem] = P.model_path_problems(_preset_cfg(tmp_path, headless))
    assert problem.field == "pools.prm.model.path"
    assert problem.message.startswith(f"{headless}: ") and "missing v_head.summary.weight" in problem.message


def test_a_head_of_the_wrong_shape_is_refused(tmp_path):
    path = _write_checkpoint(tmp_path / "wide")
    state = load_file(str(path / "model.safetensors"))
    state[V.HEAD_WEIGHT] = torch.zeros(2, HIDDEN, dtype=torch.bfloat16)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert "not those of a Linear(32, 1)" in V.value_head_problem(path)
    with pytest.raises(CheckpointError, match="Linear"):
        load_step_scorer(path)


def test_missing_body_weights_are_not_initialised_at_random(tmp_path):
    path = _write_checkpoint(tmp_path / "bodyless")
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"body weights missing.*layers\.1\.mlp\.down_proj"):
        load_step_scorer(path)


def test_detection_reads_files_only(checkpoint):
    code = ("import sys; from arbitrage_common.backends import value_head_prm as v; "
            f"assert v.is_value_head_prm({str(checkpoint)!r}) and v.value_head_problem({str(checkpoint)!r}) is None; "
            "print([m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
