"""Model families: the one place that knows how a captioning model is fed, trained and decoded.

train_blip.py and inference.py are written against the small `Family` interface below. Each
supported model family is one subclass of it, chosen from the model's own config (`model_type`):

    family = families.load(MODEL_ID)          # reads config.json, picks the entry, loads the processor
    model = family.load_model(MODEL_ID)       # through transformers' Auto classes

What an entry says about its family:
- settings: `lora_targets` (what LORA_TARGET_MODULES="auto" means), `vision_modules` (what
  FREEZE_VISION freezes and which LoRA targets it drops);
- batches: `tokenize` (caption -> token ids) and `collate` (input_ids, attention_mask, and labels
  with -100 wherever nothing is to be learnt);
- the training forward: `logits(model, batch, image_embeds)`, aligned with the labels;
- captions: `generate_from_embeds` and `decode`;
- optional speed hooks: `vision_stages` (the vision tower as a list of steps, which makes the
  frozen-prefix cache in training and the shared vision pass in inference possible) and
  `enable_sdpa`. A family without them takes the plain path: full forwards, full generate() calls.

To add a family: write its subclass, register it in FAMILIES, and add a tiny-config builder to
the tests. Nothing runs at import.
"""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError


# ----------------------------------------------------------------------------- the interface
class Family:
    """What the scripts need to know about one model family. The defaults are the plain path of a
    decoder that reads the image and then the caption (GIT's): an entry overrides what differs."""

    name = "generic"
    model_types: tuple[str, ...] = ()  # config.model_type values this entry handles
    lora_targets: tuple[str, ...] | str = "all-linear"  # LORA_TARGET_MODULES="auto" means these
    vision_modules: tuple[str, ...] = ()  # module names FREEZE_VISION freezes (and drops LoRA targets in)
    default_prompt = ""  # PROMPT="auto" means this: the family's task prompt, if it has one
    takes_prompt = False  # whether batches and generate() use a text prompt before the caption

    def __init__(self, config, processor, prompt: str | None = None):
        self.config = config
        self.processor = processor
        self.prompt = self.default_prompt if prompt in (None, "auto") else prompt
        if self.prompt and not self.takes_prompt:
            raise UserError(
                f"PROMPT={prompt!r}: the {self.name} family captions without a prompt; use 'auto'"
            )

    def load_model(self, model_id: str, constant: str = "MODEL_ID", **kwargs):
        """Through the Auto class, on torch's fused attention (SDPA) where transformers has it."""
        from transformers import AutoModelForImageTextToText

        try:
            try:
                return AutoModelForImageTextToText.from_pretrained(
                    model_id, attn_implementation="sdpa", **kwargs
                )
            except ValueError as e:  # "... does not support an attention implementation through SDPA yet"
                if "attention implementation" not in str(e):
                    raise
                return AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
        except OSError:
            raise UserError(offline_hint(model_id, constant)) from None

    # ---- batches
    def max_caption_tokens(self) -> int:
        return self.config.get_text_config().max_position_embeddings

    def tokenize(self, captions: list[str], max_tokens: int) -> list[np.ndarray]:
        """Token ids once per caption, as small int32 arrays (a Python list of ints costs ~10x more
        per caption with 100k captions). Truncation keeps the tokenizer's end token."""
        ids = []
        for start in range(0, len(captions), 4096):
            batch = self.processor.tokenizer(
                captions[start : start + 4096], truncation=True, max_length=max_tokens
            )
            ids += [np.asarray(x, dtype=np.int32) for x in batch.input_ids]
        return ids

    def collate(self, examples: list[dict]) -> dict:
        """Batch with per-batch padding on the right; labels are the input ids with every pad set to
        -100. Items whose vision prefix is cached come without pixels; `pixel_rows` says which have them."""
        pad = self.processor.tokenizer.pad_token_id
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            input_ids[row, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
            attention_mask[row, : len(e["input_ids"])] = 1
        input_ids = self.start_tokens(input_ids)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        with_pixels = [row for row, e in enumerate(examples) if e.get("pixel_values") is not None]
        return {
            "index": torch.tensor([e["index"] for e in examples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_rows": torch.tensor(with_pixels, dtype=torch.long),
            "pixel_values": torch.stack([examples[r]["pixel_values"] for r in with_pixels])
            if with_pixels
            else None,
        }

    def start_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where a family trains from another start token than its tokenizer writes (BLIP's [DEC])."""
        return input_ids

    def pixel_values(self, images) -> torch.Tensor:
        """PIL images -> the pixel tensor the model sees (resized and normalised by the processor)."""
        return self.processor(images=images, return_tensors="pt").pixel_values

    # ---- the training forward
    def caption_logits(self, model, batch: dict, image_embeds=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) aligned position by position: logits[:, t] predicts targets[:, t], and
        targets are -100 wherever nothing is to be learnt. The default is a decoder that puts the
        image positions first (GIT): they are cut off, then the usual next-token shift."""
        logits = model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
        ).logits
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1] :]
        return logits[:, :-1], batch["labels"][:, 1:]

    # ---- captions
    def generate(self, model, pixel_values, **generate_kwargs) -> torch.Tensor:
        """Caption token ids for a batch of pixels (the caption only: any prompt is cut off)."""
        return model.generate(pixel_values=pixel_values, **generate_kwargs)

    def generate_from_embeds(self, model, image_embeds, **generate_kwargs) -> torch.Tensor:
        raise NotImplementedError  # only needed with vision_stages

    def decode(self, ids) -> list[str]:
        return [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    # ---- optional speed hooks
    def vision_stages(self, model) -> list | None:
        """The vision tower as a list of callables whose composition gives `image_embeds`, or None."""
        return None

    def prefix_shape(self, model, stages: int) -> tuple[int, ...]:
        """Shape of one image's output after the first `stages` vision stages (0: the pixels)."""
        raise NotImplementedError  # only needed with vision_stages

    def enable_sdpa(self, model) -> int:
        """Switch attention to torch's fused SDPA where the family needs a patch; returns the count."""
        return 0


# ----------------------------------------------------------------------------- decoder-only, with a prompt
class PromptedDecoder(Family):
    """A decoder-only VLM asked for its caption in a chat turn (LLaVA, Idefics3 / SmolVLM):

        [prompt: the chat template's user turn with the image and `self.prompt`, then the assistant
         header, with the image token(s) expanded by the processor] [caption] [end]

    - `prompt_ids`: the prompt as the processor writes it for one image (every image gets the same
      one, since images are preprocessed to one fixed size), computed once.
    - `tokenize`: the caption as the tokenizer writes it right after the prompt (the prompt text is
      tokenized with it and cut off), then the end of the assistant turn: the template's end-of-turn
      token where it writes one (Idefics3's <end_of_utterance>), else the tokenizer's EOS.
    - `collate`: prompt + caption + end, padded on the right; labels are -100 on every prompt token
      (image tokens included) and pad: only the caption and its end token are learnt.
    - `caption_logits`: the logits from the prompt's last position on (`logits_to_keep`), aligned.
    - `generate`: left-padded prompts (see `generate_after`), the prompt cut off the output, and
      generation stops at the end token; max_new_tokens / min_new_tokens count caption tokens.
    An entry names its `image_kwargs` (extra image-processor settings) and its modules."""

    takes_prompt = True
    default_prompt = "Describe this image in one sentence."
    image_kwargs: dict = {}  # image-processor settings that make every image one fixed-size input
    _SLOT = "CAPTIONSLOT"  # a stand-in answer, to find where the template puts the caption

    def chat(self, answer: str | None = None) -> str:
        """The chat template's text: the user turn (image + prompt), then the assistant header, or
        the whole assistant turn when `answer` is given."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=answer is None
        )

    @property
    def prompt_ids(self) -> list[int]:
        if getattr(self, "_prompt_ids", None) is None:
            from PIL import Image

            blank = Image.new("RGB", (64, 48))  # any image: the token count comes from the fixed input size
            out = self.processor(text=[self.chat()], images=[blank], **self.image_kwargs)
            self._prompt_ids = [int(t) for t in out["input_ids"][0]]
        return self._prompt_ids

    def answer_parts(self) -> tuple[str, str]:
        """(text between the prompt and the caption, text after the caption) in the template."""
        prompt, full = self.chat(), self.chat(self._SLOT)
        if not full.startswith(prompt) or full.count(self._SLOT) != 1:
            return " ", ""
        lead, tail = full[len(prompt) :].split(self._SLOT)
        return lead, tail

    @property
    def end_id(self) -> int:
        """The token that ends a caption: the template's end-of-turn token if it writes one, else EOS."""
        tok = self.processor.tokenizer
        tail = self.answer_parts()[1].strip()
        ids = tok(tail, add_special_tokens=False).input_ids if tail else []
        if ids and ids[0] in tok.all_special_ids:
            return ids[0]
        return tok.eos_token_id

    @property
    def pad_id(self) -> int:
        pad = self.processor.tokenizer.pad_token_id
        return self.end_id if pad is None else pad

    def max_caption_tokens(self) -> int:
        return super().max_caption_tokens() - len(self.prompt_ids)

    def tokenize(self, captions: list[str], max_tokens: int) -> list[np.ndarray]:
        """Caption ids as they follow the prompt, then the end token (kept when truncating)."""
        tok = self.processor.tokenizer
        lead = self.answer_parts()[0]
        anchor = self.chat()
        anchor_ids = tok(anchor).input_ids
        end = self.end_id
        out = []
        for start in range(0, len(captions), 4096):
            chunk = captions[start : start + 4096]
            for caption, ids in zip(chunk, tok([anchor + lead + c for c in chunk]).input_ids, strict=True):
                if ids[: len(anchor_ids)] == anchor_ids:
                    ids = ids[len(anchor_ids) :]
                else:  # the caption merged into the prompt's last token: tokenize it alone
                    ids = tok(lead + caption, add_special_tokens=False).input_ids
                out.append(np.asarray([*ids[: max_tokens - 1], end], dtype=np.int32))
        return out

    def collate(self, examples: list[dict]) -> dict:
        prompt = torch.tensor(self.prompt_ids, dtype=torch.long)
        n_prompt = len(prompt)
        width = n_prompt + max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for row, e in enumerate(examples):
            caption = torch.as_tensor(e["input_ids"], dtype=torch.long)
            end = n_prompt + len(caption)
            input_ids[row, :n_prompt] = prompt
            input_ids[row, n_prompt:end] = caption
            attention_mask[row, :end] = 1
            labels[row, n_prompt:end] = caption
        rows = [row for row, e in enumerate(examples) if e.get("pixel_values") is not None]
        return {
            "index": torch.tensor([e["index"] for e in examples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_rows": torch.tensor(rows, dtype=torch.long),
            "pixel_values": torch.stack([examples[r]["pixel_values"] for r in rows]) if rows else None,
        }

    def pixel_values(self, images) -> torch.Tensor:
        return self.processor.image_processor(images, return_tensors="pt", **self.image_kwargs).pixel_values

    def caption_logits(self, model, batch: dict, image_embeds=None):
        """Logits only from the prompt's last position on (the prompt's own ~600 positions x the
        vocabulary would be most of the memory), aligned with the caption tokens after it."""
        n_prompt = len(self.prompt_ids)
        keep = batch["input_ids"].shape[1] - n_prompt + 1
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            logits_to_keep=keep,
            use_cache=False,
        ).logits
        return logits[:, :-1], batch["labels"][:, n_prompt:]

    def generate(self, model, pixel_values, **generate_kwargs) -> torch.Tensor:
        prompts = [self.prompt_ids] * pixel_values.shape[0]
        return self.generate_after(model, prompts, pixel_values=pixel_values, **generate_kwargs)

    def generate_after(self, model, prompts: list[list[int]], **generate_kwargs) -> torch.Tensor:
        """generate() after prompt ids that may differ in length per row: padded on the LEFT (with a
        zero attention mask there), so every row's last prompt token sits at the same position and
        the new tokens are appended right after it; returns only the new tokens."""
        width = max(len(p) for p in prompts)
        device = generate_kwargs["pixel_values"].device if "pixel_values" in generate_kwargs else None
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            attention_mask[row, width - len(p) :] = 1
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            eos_token_id=self.end_id,
            pad_token_id=self.pad_id,
            **generate_kwargs,
        )
        return out[:, width:]


# ----------------------------------------------------------------------------- BLIP
class Blip(Family):
    """BlipForConditionalGeneration: a ViT, and a BERT decoder that cross-attends to its output.
    Every speed hook: the frozen-prefix cache, the shared vision pass, the SDPA patch."""

    name = "blip"
    model_types = ("blip",)
    lora_targets = (  # the tutorial's: q/k/v of vision layers 6-9 and of text layers 5-6
        *[f"vision_model.encoder.layers.{i}.self_attn.qkv" for i in (6, 7, 8, 9)],
        *[
            f"text_decoder.bert.encoder.layer.{i}.attention.self.{p}"
            for i in (5, 6)
            for p in ("query", "key", "value")
        ],
    )
    vision_modules = ("vision_model",)

    def start_tokens(self, input_ids):
        """BLIP generates after a [DEC] token (bos_token_id), not the [CLS] its tokenizer puts first,
        so it trains that way too: position 0 becomes [DEC]."""
        input_ids[:, 0] = self.config.text_config.bos_token_id
        return input_ids

    def caption_logits(self, model, batch: dict, image_embeds=None):
        if image_embeds is None:
            image_embeds = run_stages(self.vision_stages(model), batch["pixel_values"])
        logits = model.text_decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            encoder_hidden_states=image_embeds,
            use_cache=False,
        ).logits
        return logits[:, :-1], batch["labels"][:, 1:]

    def generate_from_embeds(self, model, image_embeds, **generate_kwargs) -> torch.Tensor:
        """BLIP's generate() minus its vision forward: every caption starts with [DEC] and ends at
        [SEP]. The text decoder's generate() does batching, beams and the KV cache."""
        text = self.config.text_config
        n = image_embeds.shape[0]
        start = torch.full((n, 1), text.bos_token_id, dtype=torch.long, device=image_embeds.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return model.text_decoder.generate(
            input_ids=start,
            eos_token_id=text.sep_token_id,
            pad_token_id=text.pad_token_id,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            **generate_kwargs,
        )

    def vision_stages(self, model) -> list:
        """Embeddings, each encoder layer, the final layer norm: in order, `vision_model(x)[0]`."""
        vision = model.vision_model
        return [vision.embeddings, *vision.encoder.layers, vision.post_layernorm]

    def prefix_shape(self, model, stages: int) -> tuple[int, ...]:
        vc = model.config.vision_config
        if stages == 0:
            return (3, vc.image_size, vc.image_size)
        return ((vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size)  # patches + [CLS]

    def enable_sdpa(self, model) -> int:
        return enable_blip_sdpa(model)


# ----------------------------------------------------------------------------- GIT
class Git(Family):
    """GitForCausalLM: a CLIP image encoder whose projected patches come first in one BERT-style
    decoder, then the caption ([CLS] ... [SEP]). The plain path: its forward cannot take image
    features from outside, so no prefix cache (yet)."""

    name = "git"
    model_types = ("git",)
    lora_targets = (
        "query",
        "key",
        "value",
    )  # the decoder's attention; the vision tower's are q_proj/k_proj/v_proj
    vision_modules = ("git.image_encoder", "git.visual_projection")


# ----------------------------------------------------------------------------- BLIP-2
class Blip2(Family):
    """Blip2ForConditionalGeneration: a ViT, a Q-Former whose `num_query_tokens` learned queries read
    it, and a projection that turns their outputs into that many input embeddings of a language
    model, an OPT decoder or a Flan-T5 encoder-decoder. The embeddings replace the `<image>`
    placeholder tokens in `input_ids`: without those tokens the model gets no image at all and
    raises no error, so every sequence here is built with them, in the processor's layout.

    - OPT (decoder-only): `<image>` x N, `</s>` (OPT's BOS), the prompt, the caption, `</s>` (OPT's
      tokenizer adds no end token; we append it so the model learns to stop). Labels: the caption and
      its `</s>` only. Every caption has the same prefix, so no padding is ever needed to generate.
    - Flan-T5 (encoder-decoder): the encoder reads `<image>` x N, the prompt, `</s>` (T5's layout);
      the caption and `</s>` are the decoder's labels, aligned with its logits (no shift).

    No prompt by default: BLIP-2 captions from the image alone (transformers' and LAVIS's captioning
    use); PROMPT (e.g. "a photo of") is trained and captioned with alike. LoRA targets: the language
    model's attention (OPT q_proj/v_proj, T5 q/v; the vision tower has `qkv` and the Q-Former
    `query`/`value`, so the names hit only the language model). FREEZE_VISION freezes the vision
    tower, the Q-Former with its queries, and the projection. Speed: the vision tower + Q-Former +
    projection are vision stages, so a frozen tower is cached in training (the Q-Former has dropout,
    so it runs every step) and one vision pass feeds both captions when comparing with the base."""

    name = "blip-2"
    model_types = ("blip-2",)
    lora_targets = ("q_proj", "v_proj")  # OPT's; __init__ picks T5's ("q", "v") for a Flan-T5 model
    vision_modules = ("vision_model", "qformer", "query_tokens", "language_projection")
    takes_prompt = True

    def __init__(self, config, processor, prompt: str | None = None):
        super().__init__(config, processor, prompt)
        self.encoder_decoder = not config.use_decoder_only_language_model
        if self.encoder_decoder:
            self.lora_targets = ("q", "v")  # T5Attention's; the decoder's cross-attention included
        tok = processor.tokenizer
        text = config.text_config
        prompt_ids = tok(self.prompt, add_special_tokens=False).input_ids if self.prompt else []
        image = [config.image_token_id] * config.num_query_tokens
        self.eos = text.eos_token_id if text.eos_token_id is not None else tok.eos_token_id
        if self.encoder_decoder:
            self.prefix = image + prompt_ids + [self.eos]
        else:
            bos = text.bos_token_id if text.bos_token_id is not None else tok.bos_token_id
            self.prefix = image + [bos] + prompt_ids
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else text.pad_token_id

    # ---- batches
    def max_caption_tokens(self) -> int:
        if self.encoder_decoder:
            return 512  # T5's relative positions have no hard limit; Flan-T5 was trained to 512
        return self.config.text_config.max_position_embeddings - len(self.prefix)

    def tokenize(self, captions: list[str], max_tokens: int) -> list[np.ndarray]:
        """The caption's tokens and the end token (kept when truncating); no BOS, no prompt."""
        lead = " " if self.prompt and not self.encoder_decoder and not self.prompt.endswith(" ") else ""
        ids = []
        for start in range(0, len(captions), 4096):
            batch = self.processor.tokenizer(
                [lead + c for c in captions[start : start + 4096]], add_special_tokens=False
            )
            ids += [np.asarray([*x[: max_tokens - 1], self.eos], dtype=np.int32) for x in batch.input_ids]
        return ids

    def collate(self, examples: list[dict]) -> dict:
        """OPT: prefix + caption in one sequence, padded on the right. T5: the prefix to the encoder,
        the caption to the decoder (started with decoder_start_token_id). Labels -100 but on captions."""
        prefix = torch.tensor(self.prefix, dtype=torch.long)
        captions = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        n = len(examples)
        if self.encoder_decoder:
            width = max(len(c) for c in captions)
            labels = torch.full((n, width), -100, dtype=torch.long)
            decoder_ids = torch.full((n, width), self.pad, dtype=torch.long)
            decoder_mask = torch.zeros((n, width), dtype=torch.long)
            start = self.config.text_config.decoder_start_token_id
            for row, c in enumerate(captions):
                labels[row, : len(c)] = c
                decoder_ids[row, : len(c)] = torch.cat([torch.tensor([start]), c[:-1]])
                decoder_mask[row, : len(c)] = 1
            batch = {
                "input_ids": prefix.repeat(n, 1),
                "attention_mask": torch.ones_like(prefix).repeat(n, 1),
                "decoder_input_ids": decoder_ids,
                "decoder_attention_mask": decoder_mask,
                "labels": labels,
            }
        else:
            width = len(prefix) + max(len(c) for c in captions)
            input_ids = torch.full((n, width), self.pad, dtype=torch.long)
            attention_mask = torch.zeros((n, width), dtype=torch.long)
            labels = torch.full((n, width), -100, dtype=torch.long)
            for row, c in enumerate(captions):
                end = len(prefix) + len(c)
                input_ids[row, :end] = torch.cat([prefix, c])
                attention_mask[row, :end] = 1
                labels[row, len(prefix) : end] = c
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with_pixels = [row for row, e in enumerate(examples) if e.get("pixel_values") is not None]
        return {
            "index": torch.tensor([e["index"] for e in examples]),
            **batch,
            "pixel_rows": torch.tensor(with_pixels, dtype=torch.long),
            "pixel_values": (
                torch.stack([examples[r]["pixel_values"] for r in with_pixels]) if with_pixels else None
            ),
        }

    # ---- the training forward
    def caption_logits(self, model, batch: dict, image_embeds=None):
        """With `image_embeds` (the vision stages' output: the projected queries), the language model
        on the embeddings with the queries put in place of the `<image>` tokens; without, the model's
        own forward (the same thing, from pixels)."""
        decoder = ("decoder_input_ids", "decoder_attention_mask") if self.encoder_decoder else ()
        extra = {k: batch[k] for k in decoder}
        if image_embeds is None:
            logits = model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
                **extra,
            ).logits
        else:
            embeds = self._embed(model, batch["input_ids"], image_embeds)
            logits = model.language_model(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False, **extra
            ).logits
        if self.encoder_decoder:
            return logits, batch["labels"]
        return logits[:, :-1], batch["labels"][:, 1:]

    def _embed(self, model, input_ids, image_embeds):
        embeds = model.get_input_embeddings()(input_ids)
        where = (input_ids == self.config.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(where, image_embeds.to(embeds.dtype))

    # ---- captions
    def _prompt_ids(self, n: int, device) -> torch.Tensor:
        return torch.tensor([self.prefix], dtype=torch.long, device=device).repeat(n, 1)

    def _caption_only(self, ids, input_ids):
        """Decoder-only generate() returns the prompt too; T5's starts with the decoder start token."""
        return ids[:, 1:] if self.encoder_decoder else ids[:, input_ids.shape[1] :]

    def generate(self, model, pixel_values, **generate_kwargs) -> torch.Tensor:
        input_ids = self._prompt_ids(len(pixel_values), pixel_values.device)
        ids = model.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **generate_kwargs,
        )
        return self._caption_only(ids, input_ids)

    def generate_from_embeds(self, model, image_embeds, **generate_kwargs) -> torch.Tensor:
        """BLIP-2's generate() minus its vision forward: the language model's generate() (batching,
        beams, KV cache) on the prompt's embeddings with the queries in place."""
        input_ids = self._prompt_ids(len(image_embeds), image_embeds.device)
        inputs = {
            "inputs_embeds": self._embed(model, input_ids, image_embeds),
            "attention_mask": torch.ones_like(input_ids),
        }
        if not self.encoder_decoder:
            inputs["input_ids"] = input_ids
        return self._caption_only(model.language_model.generate(**inputs, **generate_kwargs), input_ids)

    # ---- speed hooks
    def vision_stages(self, model) -> list:
        """Embeddings, each vision layer, the final layer norm, then the Q-Former + projection as one
        stage: in order, the `language_model_inputs` of BLIP-2's own forward."""
        vision = model.vision_model
        return [vision.embeddings, *vision.encoder.layers, vision.post_layernorm, _Blip2Queries(model)]

    def prefix_shape(self, model, stages: int) -> tuple[int, ...]:
        c = model.config
        vc = c.vision_config
        if stages == 0:
            return (3, vc.image_size, vc.image_size)
        if stages < len(self.vision_stages(model)):
            return ((vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size)  # patches + [CLS]
        return (c.num_query_tokens, c.text_config.hidden_size)


class _Blip2Queries(torch.nn.Module):
    """BLIP-2's learned queries read the vision tower's output through the Q-Former, and the
    projection maps them into the language model's embedding space (the model's own modules)."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, image_embeds):
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=mask,
            return_dict=True,
        ).last_hidden_state
        return self.language_projection(out.to(image_embeds.dtype))


# ----------------------------------------------------------------------------- LLaVA and Idefics3 / SmolVLM
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class Llava(PromptedDecoder):
    """LlavaForConditionalGeneration (LLaVA / LLaVA-1.5): CLIP patches of one layer (the second to
    last by default) through a 2-layer MLP projector replace the <image> tokens of a chat prompt in a
    Llama/Vicuna decoder. Prompt: "USER: <image>\nDescribe this image in one sentence. ASSISTANT:"
    (the processor's chat template); the caption ends with the tokenizer's EOS.

    The vision layers after the one LLaVA reads are removed when the model loads: they cost a
    forward pass for nothing, and LoRA on them ("all-linear") would never get a gradient (a dead
    adapter, which also makes DDP fail). The model computes the same, and saves that way (MERGE_TO)."""

    name = "llava"
    model_types = ("llava",)
    vision_modules = ("model.vision_tower", "model.multi_modal_projector")  # FREEZE_VISION: tower + projector
    language_model = "model.language_model"

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """q/k/v/o of every decoder layer, named in full: the CLIP tower has q_proj/k_proj/v_proj too."""
        layers = self.config.get_text_config().num_hidden_layers
        lm = self.language_model
        return tuple(f"{lm}.layers.{i}.self_attn.{p}" for i in range(layers) for p in _ATTENTION)

    def load_model(self, model_id: str, constant: str = "MODEL_ID", **kwargs):
        return drop_unread_vision_layers(super().load_model(model_id, constant, **kwargs))


def drop_unread_vision_layers(model):
    """Remove the CLIP layers after the last one LLaVA reads (vision_feature_layer); the index it
    reads becomes a positive one, which means the same layer with fewer layers after it."""
    config = model.config
    layers = model.model.vision_tower.encoder.layers
    n = len(layers)
    picked = config.vision_feature_layer
    wanted = [k if k >= 0 else n + 1 + k for k in (picked if isinstance(picked, (list, tuple)) else [picked])]
    keep = max(wanted)  # hidden_states[k] is the output of layer k - 1
    if keep < n:
        del layers[keep:]
        config.vision_config.num_hidden_layers = keep
        config.vision_feature_layer = wanted if isinstance(picked, (list, tuple)) else wanted[0]
    return model


class Idefics3(PromptedDecoder):
    """Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration (SmolVLM-256M/500M/2B,
    Idefics3-8B): SigLIP patches, pixel-shuffled and projected by the connector, fill the <image>
    tokens (between <fake_token_around_image><global-img> markers) of a chat prompt in a Llama /
    SmolLM decoder. Prompt: "<|im_start|>User:<image>Describe this image in one sentence.
    <end_of_utterance>\nAssistant:" (the processor's chat template); the caption ends with
    <end_of_utterance>, as the template writes the assistant turn.

    Each image is one square frame at the processor's max_image_size (do_image_splitting=False):
    64 image tokens for SmolVLM-256M, instead of up to 17 frames of them. Every image then gets the
    same prompt, and a batch stacks."""

    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    vision_modules = ("model.vision_model", "model.connector")  # FREEZE_VISION: tower + connector
    language_model = "model.text_model"
    image_kwargs = {"do_image_splitting": False}
    lora_targets = Llava.lora_targets

    def pixel_values(self, images) -> torch.Tensor:
        """(images, 1 frame, 3, size, size): one list per image, else they are one sample's frames."""
        return self.processor.image_processor(
            [[im] for im in images], return_tensors="pt", **self.image_kwargs
        ).pixel_values


# ----------------------------------------------------------------------------- PaliGemma, Florence-2, IDEFICS
# Three families that caption after a task prompt. Each builds its prompt once, by running its own
# processor on a blank image (so the layout is the processor's, whatever tokenizer the checkpoint
# has), and every batch is that fixed prefix followed by the caption. One prompt for all images means
# every prefix has the same length: batched generation needs no padding, so batched captions equal
# one-by-one captions (tested); the tokenizer is still set to pad on the left. No prefix cache (the
# vision-stage hook) yet: their forwards take pixels, not image features, in a way generate() keeps.
def _blank_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (128, 128, 128))


def _lm_attention(config, stem: str, projections=("q_proj", "k_proj", "v_proj", "o_proj")) -> tuple[str, ...]:
    """Full module names of the language model's attention projections, one per layer: scoped to the
    language model, since the vision towers use the same short names (q_proj, ...)."""
    layers = config.get_text_config().num_hidden_layers
    return tuple(f"{stem}.{i}.self_attn.{p}" for i in range(layers) for p in projections)


def _pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def _image_pixels(processor, images) -> torch.Tensor:
    """The image processor alone (the processors warn, or insist on text, when called without any),
    one [3, H, W] tensor per image."""
    out = processor.image_processor(images, return_tensors="pt")
    out = out if isinstance(out, torch.Tensor) else out["pixel_values"]
    return out.reshape(-1, *out.shape[-3:])


def _caption_ids(tok, captions, max_tokens: int, start: tuple = ()) -> list[np.ndarray]:
    """start + the caption's tokens + the end token (kept when truncating), as int32 arrays. A fast
    tokenizer keeps a truncation setting in its backend (and writes it into tokenizer.json on save,
    where it would cut the next prompt short): it is switched off again here."""
    ids = []
    for i in range(0, len(captions), 4096):
        batch = tok(
            captions[i : i + 4096],
            add_special_tokens=False,
            truncation=True,
            max_length=max_tokens - 1 - len(start),
        )
        ids += [np.asarray([*start, *x, tok.eos_token_id], dtype=np.int32) for x in batch.input_ids]
    if getattr(tok, "backend_tokenizer", None) is not None:
        tok.backend_tokenizer.no_truncation()
    return ids


class _PrefixDecoder(Family):
    """A decoder-only model that reads [image tokens + prompt] (the prefix, the same for every image)
    and then the caption + end token. Labels are -100 on the prefix and the pads; the logits of the
    prefix, but for its last position, are never computed (logits_to_keep)."""

    takes_prompt = True

    def __init__(self, config, processor, prompt=None):
        super().__init__(config, processor, prompt)
        processor.tokenizer.padding_side = "left"  # generation; training batches are built by collate
        self.prefix = self.prefix_ids()

    def prefix_ids(self) -> list[int]:
        raise NotImplementedError

    def pixel_values(self, images):
        return _image_pixels(self.processor, images)

    def max_caption_tokens(self) -> int:
        return self.config.get_text_config().max_position_embeddings - len(self.prefix)

    def tokenize(self, captions, max_tokens):
        """The caption's tokens and the end token (kept when truncating); no start token: the prompt
        comes before it."""
        return _caption_ids(self.processor.tokenizer, captions, max_tokens)

    def collate(self, examples):
        pad = self.processor.tokenizer.pad_token_id
        n = len(self.prefix)
        rows = [[*self.prefix, *(int(t) for t in e["input_ids"])] for e in examples]
        input_ids = _pad_right(rows, pad)
        attention_mask = _pad_right([[1] * len(r) for r in rows], 0)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :n] = -100  # image tokens and prompt: read, never learnt
        with_pixels = [row for row, e in enumerate(examples) if e.get("pixel_values") is not None]
        return {
            "index": torch.tensor([e["index"] for e in examples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_rows": torch.tensor(with_pixels, dtype=torch.long),
            "pixel_values": (
                torch.stack([examples[r]["pixel_values"] for r in with_pixels]) if with_pixels else None
            ),
        }

    def model_inputs(self, batch: dict) -> dict:
        """The family's extra forward inputs (token_type_ids, image_attention_mask, ...)."""
        return {}

    def caption_logits(self, model, batch, image_embeds=None):
        n = len(self.prefix)
        width = batch["input_ids"].shape[1]
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=self.model_pixels(batch["pixel_values"]),
            use_cache=False,
            logits_to_keep=width - n + 1,
            **self.model_inputs(batch),
        ).logits
        # logits[:, j] is at position n - 1 + j and predicts the token at n + j: the caption's j-th.
        return logits[:, :-1], batch["labels"][:, n:]

    def model_pixels(self, pixel_values):
        return pixel_values

    def generate(self, model, pixel_values, **generate_kwargs):
        n = pixel_values.shape[0]
        tok = self.processor.tokenizer
        input_ids = torch.tensor([self.prefix] * n, dtype=torch.long, device=pixel_values.device)
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": None}
        out = model.generate(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"],
            pixel_values=self.model_pixels(pixel_values),
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **self.model_inputs(batch),
            **generate_kwargs,
        )
        return out[:, input_ids.shape[1] :]  # the caption only: the prompt is cut off


class PaliGemma(_PrefixDecoder):
    """PaliGemmaForConditionalGeneration: SigLIP patches (projected) as the first tokens of a Gemma
    decoder, then <bos> + prompt + newline, then the caption + <eos>. A prefix-LM: token_type_ids
    are 0 on image + prompt (they see each other both ways) and 1 on the caption (causal), as the
    processor's `suffix=` builds them for training and generate() extends them."""

    name = "paligemma"
    model_types = ("paligemma",)
    default_prompt = "caption en"
    vision_modules = ("model.vision_tower", "model.multi_modal_projector")

    @property
    def lora_targets(self):
        return _lm_attention(self.config, "language_model.layers")

    def prefix_ids(self):
        enc = self.processor(images=[_blank_image()], text=[self.prompt], suffix=["x"], truncation=False)
        ids, types = enc["input_ids"][0], enc["token_type_ids"][0]
        return [int(t) for t, k in zip(ids, types, strict=True) if k == 0]

    def model_inputs(self, batch):
        token_type_ids = torch.zeros_like(batch["input_ids"])
        if batch.get("labels") is not None:
            token_type_ids[:, len(self.prefix) :] = batch["attention_mask"][:, len(self.prefix) :]
        return {"token_type_ids": token_type_ids}


class Idefics(_PrefixDecoder):
    """IdeficsForVisionText2Text, Hugging Face's open Flamingo: a LLaMA decoder with gated
    cross-attention layers that read CLIP image features. The processor lays out
    <s><fake_token_around_image><image><fake_token_around_image>Caption: and image_attention_mask
    (one column per image) lets every token from <image> on attend to the image.

    LoRA: the decoder's self-attention, never the gated cross-attention: its output is scaled by
    tanh(alpha), and alpha starts at 0 in a fresh model (alpha_initializer="zeros"), which leaves
    any adapter there without gradient. Trained checkpoints have open gates; add them by name."""

    name = "idefics"
    model_types = ("idefics",)
    default_prompt = "Caption:"
    vision_modules = ("model.vision_model", "model.perceiver_resampler")

    @property
    def lora_targets(self):
        return _lm_attention(self.config, "model.layers")

    def prefix_ids(self):
        enc = self.processor(
            images=[_blank_image()], text=[self.prompt], truncation=False, return_tensors="pt"
        )
        self._image_from = int(enc["image_attention_mask"][0, :, 0].argmax())  # the <image> token
        return [int(t) for t in enc["input_ids"][0]]

    def model_pixels(self, pixel_values):
        return pixel_values[:, None]  # one image per caption

    def model_inputs(self, batch):
        mask = torch.zeros_like(batch["input_ids"])
        mask[:, self._image_from :] = 1
        return {"image_attention_mask": mask[:, :, None]}


class Florence2(Family):
    """Florence2ForConditionalGeneration, an encoder-decoder: DaViT image tokens + the prompt
    (the processor expands <CAPTION> to its question) go to the BART encoder; the decoder starts at
    </s><s> as the model generates, then writes the caption + </s>. Labels are the decoder's own
    tokens, aligned with its logits (no shift): -100 on <s> (given, not learnt) and on pads."""

    name = "florence2"
    model_types = ("florence2",)
    default_prompt = "<CAPTION>"
    takes_prompt = True
    vision_modules = ("model.vision_tower", "model.multi_modal_projector")

    def __init__(self, config, processor, prompt=None):
        super().__init__(config, processor, prompt)
        enc = processor(images=[_blank_image()], text=[self.prompt], truncation=False)
        self.prefix = [int(t) for t in enc["input_ids"][0]]
        text = config.get_text_config()
        self.start = [text.decoder_start_token_id, processor.tokenizer.bos_token_id]

    @property
    def lora_targets(self):
        text = self.config.get_text_config()
        return (
            *(
                f"language_model.encoder.layers.{i}.self_attn.{p}"
                for i in range(text.encoder_layers)
                for p in ("q_proj", "k_proj", "v_proj", "out_proj")
            ),
            *(
                f"language_model.decoder.layers.{i}.{a}.{p}"
                for i in range(text.decoder_layers)
                for a in ("self_attn", "encoder_attn")
                for p in ("q_proj", "k_proj", "v_proj", "out_proj")
            ),
        )

    def max_caption_tokens(self):
        return self.config.get_text_config().max_position_embeddings - 1

    def pixel_values(self, images):
        return _image_pixels(self.processor, images)

    def tokenize(self, captions, max_tokens):
        """<s> caption </s> (the end token kept when truncating)."""
        tok = self.processor.tokenizer
        return _caption_ids(tok, captions, max_tokens, start=(tok.bos_token_id,))

    def collate(self, examples):
        batch = Family.collate(self, examples)  # decoder tokens <s> caption </s>, right-padded
        batch["labels"][:, 0] = -100  # <s> comes with the start, as in generation
        ids = batch["input_ids"]
        batch["decoder_input_ids"] = torch.cat(
            [torch.full_like(ids[:, :1], self.start[0]), ids[:, :-1]], dim=1
        )  # </s> <s> caption...
        return batch

    def caption_logits(self, model, batch, image_embeds=None):
        n = batch["input_ids"].shape[0]
        prompt = torch.tensor([self.prefix] * n, dtype=torch.long, device=batch["input_ids"].device)
        logits = model(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            pixel_values=batch["pixel_values"],
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch["attention_mask"],
            use_cache=False,
        ).logits
        return logits, batch["labels"]

    def generate(self, model, pixel_values, **generate_kwargs):
        n = pixel_values.shape[0]
        tok = self.processor.tokenizer
        prompt = torch.tensor([self.prefix] * n, dtype=torch.long, device=pixel_values.device)
        start = torch.tensor([self.start] * n, dtype=torch.long, device=pixel_values.device)
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            pixel_values=pixel_values,
            decoder_input_ids=start,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **generate_kwargs,
        )
        return out[:, start.shape[1] :]


# ----------------------------------------------------------------------------- the registry
FAMILIES = {cls.name: cls for cls in (Blip, Git, Blip2, Llava, Idefics3, PaliGemma, Florence2, Idefics)}

# Families users ask for that transformers cannot train, and why; each gets its own one-line error.
_QWEN = (
    "its processor needs torchvision's video processor, which does not install beside the CPU torch "
    "this toolkit is tested on"
)
_NOT_SUPPORTED = {
    "ofa": "OFA is not in transformers (the port by its authors is inference-only), so it cannot be "
    "fine-tuned here",
    "qwen2_vl": f"Qwen2-VL is not supported yet: {_QWEN}",
    "qwen2_5_vl": f"Qwen2.5-VL is not supported yet: {_QWEN}",
}


def offline_hint(model_id: str, constant: str) -> str:
    return (
        f"could not load {model_id!r} from the Hugging Face Hub or a local folder. "
        f"Check your connection, or download it once (huggingface-cli download {model_id}) "
        f"and set --{constant}=/path/to/local/copy"
    )


def family_class(model_type: str) -> type[Family]:
    """The entry for a config's model_type, or a one-line error that lists the supported ones."""
    for cls in FAMILIES.values():
        if model_type in cls.model_types:
            return cls
    supported = ", ".join(t for cls in FAMILIES.values() for t in cls.model_types)
    why = _NOT_SUPPORTED.get(model_type, "this toolkit has no entry for it yet")
    raise UserError(f"model type {model_type!r} is not supported: {why}. Supported model types: {supported}")


def load(
    model_id: str, constant: str = "MODEL_ID", processor_from: str | None = None, prompt: str | None = None
):
    """The family entry for a model (from its config's model_type), with its processor loaded.
    `processor_from` names another folder to take the processor from (one saved beside an adapter)."""
    from transformers import AutoConfig, AutoProcessor, PretrainedConfig

    try:  # the raw config.json first: a model type transformers does not know still gets our message
        raw, _ = PretrainedConfig.get_config_dict(model_id)
    except OSError:
        raise UserError(offline_hint(model_id, constant)) from None
    cls = family_class(str(raw.get("model_type")))
    try:
        config = AutoConfig.from_pretrained(model_id)
        processor = AutoProcessor.from_pretrained(processor_from or model_id)
    except OSError:
        raise UserError(offline_hint(processor_from or model_id, constant)) from None
    return cls(config, processor, prompt)


def base_model(model):
    """The transformers model inside a peft wrapper (its LoRA layers included), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def run_stages(stages: list, hidden):
    for stage in stages:
        hidden = stage(hidden)
    return hidden


# ----------------------------------------------------------------------------- BLIP's SDPA patch
# BLIP in transformers 5.x only has the eager attention path: it builds the full (heads x tokens x
# tokens) probability matrix and keeps it for backward. torch's fused scaled_dot_product_attention
# (SDPA) computes the same thing without materialising it. We switch existing module instances
# over (their own qkv/query/key/value Linears still run, so LoRA wrappers on them still apply), and
# fall back to the eager code whenever attention maps are asked for, since SDPA does not return them.
def _attentions_requested(kwargs: dict) -> bool:
    """True if this forward must return attention probabilities (output_attentions=True)."""
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers 5 records attentions with hooks; the active request lives in a context var
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def _sdpa(query, key, value, mask, dropout: float, scale: float | None = None):
    """SDPA with an additive float mask cast to the query dtype (bf16 under autocast); bool kept.

    One exception: training in bf16 on a CPU. There torch's fused CPU kernel is fast forward but its
    backward is ~3x slower than plain matmuls + softmax, which AMX runs in bf16 (4 x 577 image tokens,
    12 heads: 88 ms against 31 ms forward + backward, same gradient error against fp32); so with
    gradients on, bf16 CPU attention takes the eager formula, as a bf16 model on eager attention would."""
    if mask is not None and mask.dtype.is_floating_point:
        mask = mask.to(device=query.device, dtype=query.dtype)
    if _matmul_attention_is_faster(query, key, value):
        return _matmul_attention(query, key, value, mask, dropout, scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)


def _matmul_attention_is_faster(query, key, value) -> bool:
    """bf16 on a CPU, with a backward pass to come (see _sdpa)."""
    return (
        query.device.type == "cpu"
        and query.dtype == torch.bfloat16
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
    )


def _matmul_attention(query, key, value, mask, dropout: float, scale: float | None = None):
    """softmax(Q K^T * scale + mask) V, the eager formula; the same defaults as SDPA."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query * scale) @ key.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return F.dropout(scores.softmax(-1), dropout, training=dropout > 0) @ value


def _vision_sdpa_forward(self, hidden_states, **kwargs):
    """BlipAttention.forward (vision self-attention, fused qkv) on SDPA; same outputs, no probs."""
    if _attentions_requested(kwargs):
        return type(self).forward(self, hidden_states, **kwargs)
    bsz, tgt_len, embed_dim = hidden_states.size()
    qkv = (
        self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    )
    dropout = self.dropout.p if self.training else 0.0
    context = _sdpa(qkv[0], qkv[1], qkv[2], None, dropout, scale=self.scale)
    context = context.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)
    return self.projection(context), None


def _text_sdpa_forward(
    self,
    hidden_states,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    cache=None,
    **kwargs,
):
    """BlipTextSelfAttention.forward (decoder self- and cross-attention) on SDPA.

    The key/value cache handling is the eager method's, line for line; only the score/softmax/
    weighted-sum part changes. Masks arrive already expanded to 4-D additive floats (causal for
    self-attention) by BlipTextModel, so they pass straight through as SDPA's attn_mask.
    """
    if _attentions_requested(kwargs) or "past_key_values" in kwargs:
        return type(self).forward(
            self,
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            cache,
            **kwargs,
        )
    from transformers.cache_utils import EncoderDecoderCache

    input_shape = hidden_states.shape[:-1]
    query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
    is_cross = encoder_hidden_states is not None
    mask = encoder_attention_mask if is_cross else attention_mask

    is_updated = False
    layer_cache = cache
    if isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(self.layer_idx)
        layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
    if is_cross and cache is not None and is_updated:  # image keys/values computed at the first step
        key = layer_cache.layers[self.layer_idx].keys
        value = layer_cache.layers[self.layer_idx].values
    else:
        states = encoder_hidden_states if is_cross else hidden_states
        kv_shape = (*states.shape[:-1], -1, self.attention_head_size)
        key = self.key(states).view(kv_shape).transpose(1, 2)
        value = self.value(states).view(kv_shape).transpose(1, 2)
        if cache is not None:
            key, value = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)
            if is_cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True

    dropout = self.dropout.p if self.training else 0.0
    context = _sdpa(query, key, value, mask, dropout)  # default scale is 1/sqrt(head size), as eager
    context = context.transpose(1, 2).reshape(*input_shape, self.all_head_size)
    return context, None


def enable_blip_sdpa(model, text: bool = True) -> int:
    """Run BLIP's attention modules on torch SDPA; returns how many modules now use it.

    Works on the plain model or through a peft wrapper (modules are found by type), before or
    after get_peft_model. Calling it twice changes nothing. `text=False` keeps the text decoder
    on eager attention and switches only the vision encoder.
    """
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    patches = [(BlipAttention, _vision_sdpa_forward)]
    if text:
        patches.append((BlipTextSelfAttention, _text_sdpa_forward))
    switched = 0
    for module in model.modules():
        for cls, forward in patches:
            if isinstance(module, cls):
                # An instance attribute shadows the class method; the class's eager forward stays
                # reachable as type(module).forward for the fallback above.
                module.forward = types.MethodType(forward, module)
                switched += 1
    return switched
