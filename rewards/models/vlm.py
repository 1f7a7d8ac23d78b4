"""`vlm`: a vision-language model as judge, asked templated questions about each image.

Two ways to turn an answer into a number:
- "yes_prob" (VQAScore, Lin et al., 2024, arXiv 2404.01291): the probability of "Yes" as the next token,
  softmax over the Yes/No logits only. Continuous, no text parsing, one forward pass per question.
- "number" (judges such as UnifiedReward): generate greedily, take group 1 of the *last* match of
  `number_pattern` (judges reason first and score last), map `number_range` onto [0, 1]; an answer with
  no number or one out of range fails the item (ok False), it never becomes 0.
The primary score is the mean over the questions; with several questions each is also an extra. An
item fails when any of its questions does. Question templates come from the recipe; `{prompt}` is
replaced by the item's prompt.

Backends behind one interface: "transformers" (CPU and tests: `AutoModelForImageTextToText`, batched
with left padding) and "vllm" (GPU: `vllm.LLM` with `multi_modal_data`; imported only when chosen).
Both build the prompt with the checkpoint's own chat template. vLLM returns the top-`top_logprobs`
next tokens only: Yes or No outside that list counts as probability 0, both outside fails the item.

Example (recipe):
    scorer: vlm
    scorer_kwargs: {weights: /ckpt/Qwen2.5-VL-7B-Instruct, backend: vllm, dtype: bfloat16,
                    questions: {align: 'Does this figure show "{prompt}"? Please answer yes or no.'}}
Example (Python):
    judge = make_scorer("vlm", weights="/ckpt/llava", questions={"cat": "Is there a cat? Answer Yes or No."})
    judge.score(images_uint8_nhwc, prompts).scores["vlm"]  # float32 [N] in [0, 1]
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rewards.base import ScoreBatch, ScorerInfo, register
from rewards.models._preprocess import check_batch, existing, torch_dtype

VQASCORE_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'


class _Backend(Protocol):
    processor: Any

    def next_token_logprobs(self, images: list[Any], texts: list[str], token_ids: list[int]) -> np.ndarray:
        """float [M, len(token_ids)]: log-probabilities of the next token (-inf where unknown)."""
        ...

    def generate(self, images: list[Any], texts: list[str], max_new_tokens: int) -> list[str]: ...


class _Transformers:
    def __init__(self, path: Path, device: str, dtype: str, batch_size: int) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = (
            "left"  # the answer slot is then the last position of every row
        )
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype(dtype))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' .to stub
        self.batch_size = batch_size

    def _chunks(self, images: list[Any], texts: list[str]) -> Any:
        for i in range(0, len(texts), self.batch_size):
            inputs = self.processor(text=texts[i : i + self.batch_size], images=images[i : i + self.batch_size],
                                    padding=True, return_tensors="pt")  # fmt: skip
            yield inputs.to(self.device)

    @torch.inference_mode()
    def next_token_logprobs(self, images: list[Any], texts: list[str], token_ids: list[int]) -> np.ndarray:
        # One generation step rather than a bare forward: generate derives the position ids from the
        # attention mask, so left-padded rows score as they would alone (plain forward shifts them).
        out = []
        for x in self._chunks(images, texts):
            step = self.model.generate(**x, max_new_tokens=1, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)  # fmt: skip
            out.append(step.logits[0].float().log_softmax(-1)[:, token_ids])
        return torch.cat(out).cpu().numpy()

    @torch.inference_mode()
    def generate(self, images: list[Any], texts: list[str], max_new_tokens: int) -> list[str]:
        answers: list[str] = []
        for x in self._chunks(images, texts):
            ids = self.model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)
            answers += self.processor.batch_decode(
                ids[:, x["input_ids"].shape[1] :], skip_special_tokens=True
            )
        return answers


class _VLLM:
    def __init__(self, path: Path, dtype: str, top_logprobs: int, engine_args: dict[str, Any]) -> None:
        from transformers import AutoProcessor
        from vllm import LLM

        self.processor = AutoProcessor.from_pretrained(path)
        self.llm = LLM(model=str(path), dtype=dtype, seed=0, limit_mm_per_prompt={"image": 1}, **engine_args)
        self.top_logprobs = top_logprobs

    def _requests(self, images: list[Any], texts: list[str]) -> list[dict[str, Any]]:
        return [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, images, strict=True)]

    def next_token_logprobs(self, images: list[Any], texts: list[str], token_ids: list[int]) -> np.ndarray:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.top_logprobs)
        outs = self.llm.generate(self._requests(images, texts), params, use_tqdm=False)
        result = np.full((len(outs), len(token_ids)), -np.inf, dtype=np.float32)
        for i, out in enumerate(outs):
            top = out.outputs[0].logprobs[0]  # token id -> Logprob, the top-k of the first generated position
            for j, tid in enumerate(token_ids):
                if tid in top:
                    result[i, j] = top[tid].logprob
        return result

    def generate(self, images: list[Any], texts: list[str], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        return [
            o.outputs[0].text
            for o in self.llm.generate(self._requests(images, texts), params, use_tqdm=False)
        ]


def _parse_mapping(value: dict[str, str] | str | None, default: dict[str, str]) -> dict[str, str]:
    """Questions arrive as a mapping from a recipe, or as JSON / a bare template from the CLI."""
    if value is None:
        return default
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith("{") else {"q": value}
    if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"questions must be a non-empty mapping name -> template, got {value!r}")
    return dict(value)


@register("vlm")
class VLMJudge:
    """Scores = mean over `questions` of P(Yes) (mode "yes_prob") or of a parsed number mapped to [0, 1]."""

    def __init__(
        self,
        *,
        weights: str | Path,
        device: str = "cpu",
        backend: str = "transformers",
        dtype: str = "float32",
        questions: dict[str, str] | str | None = None,
        mode: str = "yes_prob",
        yes: str = "Yes",
        no: str = "No",
        number_range: tuple[float, float] | list[float] | str = (1.0, 5.0),
        number_pattern: str = r"(-?\d+(?:\.\d+)?)",
        max_new_tokens: int | str = 64,
        system: str | None = None,
        batch_size: int | str = 8,
        top_logprobs: int | str = 20,
        engine_args: dict[str, Any] | str | None = None,
        name: str = "vlm",
    ) -> None:
        path = existing(weights, f"{name}: weights")
        if mode not in ("yes_prob", "number"):
            raise ValueError(f"{name}: mode must be 'yes_prob' or 'number', got {mode!r}")
        self.name, self.mode, self.system = name, mode, system
        self.questions = _parse_mapping(questions, {name: VQASCORE_QUESTION})
        lo, hi = (
            float(x) for x in (number_range.split(",") if isinstance(number_range, str) else number_range)
        )
        if not hi > lo:
            raise ValueError(
                f"{name}: number_range must be (low, high) with high > low, got {number_range!r}"
            )
        self.number_range = (lo, hi)
        self.number_pattern = re.compile(number_pattern)
        self.max_new_tokens = int(max_new_tokens)
        self.backend: _Backend
        if backend == "transformers":
            self.backend = _Transformers(path, device, dtype, int(batch_size))
        elif backend == "vllm":
            args = json.loads(engine_args) if isinstance(engine_args, str) else dict(engine_args or {})
            self.backend = _VLLM(path, dtype, int(top_logprobs), args)
        else:
            raise ValueError(f"{name}: backend must be 'transformers' or 'vllm', got {backend!r}")
        tokenizer = self.backend.processor.tokenizer
        self.answer_ids = []
        for word in (yes, no):
            ids = tokenizer.encode(word, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"{name}: answer {word!r} is {len(ids)} tokens for this tokenizer; pass yes=/no="
                )
            self.answer_ids.append(ids[0])
        self.version = f"{name}/{path.name}/{mode}"

    def info(self) -> ScorerInfo:
        return ScorerInfo(name=self.name, version=self.version, heads=[self.name], max_batch=16)

    def _chat(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if self.system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system}]})
        return self.backend.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def ask(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
        """Every question for every image: float32 [N, Q] in [0, 1] (NaN where it failed) and, per item,
        the first failure reason ('' when all its answers were usable)."""
        from PIL import Image

        pil = [Image.fromarray(img) for img in images]
        names = list(self.questions)
        texts = [self._chat(self.questions[q].replace("{prompt}", p)) for p in prompts for q in names]
        repeated = [im for im in pil for _ in names]
        values = np.full(len(texts), np.nan, dtype=np.float32)
        reasons = [""] * len(texts)
        if self.mode == "yes_prob":
            lp = self.backend.next_token_logprobs(repeated, texts, self.answer_ids)  # [M, 2]
            for i, (ly, ln) in enumerate(lp):
                if math.isinf(ly) and math.isinf(ln):
                    reasons[i] = "neither answer token among the most likely next tokens"
                else:  # softmax over the two answers only
                    values[i] = 1.0 / (1.0 + math.exp(min(ln - ly, 80.0)))
        else:
            lo, hi = self.number_range
            for i, answer in enumerate(self.backend.generate(repeated, texts, self.max_new_tokens)):
                found = self.number_pattern.findall(answer)
                last = found[-1] if found else None
                number = float(last[0] if isinstance(last, tuple) else last) if last else math.nan
                if math.isnan(number) or not lo <= number <= hi:
                    reasons[i] = f"no number in [{lo:g}, {hi:g}] in the answer {answer[:80]!r}"
                else:
                    values[i] = (number - lo) / (hi - lo)
        per_item = [
            next((r for r in reasons[k : k + len(names)] if r), "") for k in range(0, len(texts), len(names))
        ]
        return values.reshape(len(images), len(names)), per_item

    def score(self, images: np.ndarray, prompts: list[str]) -> ScoreBatch:
        check_batch(self.name, images, prompts)
        values, reasons = self.ask(images, prompts)
        ok = np.array([not r for r in reasons], dtype=bool)
        extras = {q: values[:, j] for j, q in enumerate(self.questions)} if len(self.questions) > 1 else {}
        return ScoreBatch(scores={self.name: values.mean(axis=1)}, extras=extras, ok=ok, errors=reasons)


_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'system' %}SYSTEM: "
    "{% else %}ASSISTANT: {% endif %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_WORDS = ["Yes", "No", "yes", "no", "Does", "Is", "this", "figure", "image", "show", "a", "cat", "dog", "red",
          "Please", "answer", "or", "Score", ":", "?", ".", *"0123456789"]  # fmt: skip


def random_checkpoint(name: str, root: str | Path, *, native: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write a random LLaVA-style VLM folder (CLIP vision tower, Llama language model, word-level tokenizer
    with a chat template, PIL image processor) under `root`; return `make_scorer("vlm", **kwargs)`
    arguments. `native`: CLIP ViT-L/14-336 + a 0.5B language model (for timing), else tiny."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "SYSTEM:", *_WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("<image>", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    specials = dict(unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, extra_special_tokens={"image_token": "<image>"}, **specials
    )
    if native:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
        text = LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
    else:
        # Head widths of 32 and 64: small, yet within what vLLM's attention kernels accept (GPU test).
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=32, patch_size=8, projection_dim=64)  # fmt: skip
        text = LlamaConfig(vocab_size=len(words), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)  # fmt: skip
    size = int(vision.image_size)  # type: ignore[arg-type]
    pixels = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=pixels,
        tokenizer=tokenizer, chat_template=_TEMPLATE, patch_size=vision.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],  # type: ignore[call-arg]
                         vision_feature_select_strategy="default", vision_feature_layer=-1)  # fmt: skip
    torch.manual_seed(seed)
    folder = Path(root) / f"vlm-{'native' if native else 'tiny'}"
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return {"weights": str(folder)}
