"""The peers `alignbench bench` measures us against, each configured at its best where it offers
options, on the same weights, batches, batch size, max length, learning rate and precision as our side
(``--precision``: fp32 or bf16 autocast; by default fp32 on CPU, bf16 on CUDA). TRL's trainers get
``bf16=True`` for bf16: accelerate's ``mixed_precision="bf16"``, torch.autocast on CPU as on CUDA.

    dpo         trl.DPOTrainer, reference log-probs precomputed (``precompute_ref_log_probs``), no
                activation checkpointing. Its ``padding_free`` mode is not used: TRL 1.16 disables it
                ("temporarily unavailable after a refactor") and falls back to padding with a warning,
                so the padded collator is what it runs either way.
    pm          trl.RewardTrainer (no padding-free mode offered: its collator pads right), no
                activation checkpointing, ``pad_to_multiple_of`` off, on the PM ours trains (the same
                ``pm_from_lm`` weights and seeded head). Its model pools at the last non-pad token,
                ours at the last attended one; where pad == EOS (SmolLM2) that reads one token earlier,
                the same compute.
    generate    ``transformers`` ``model.generate(do_sample=True)`` with plain multinomial sampling
                (top_k=0, top_p=1), left-padded prompts, HF's KV cache.
    train-loop  a plain PyTorch loop: HF's ``labels`` loss, AdamW, grad clipping.

Both TRL trainers get the rows pre-tokenised from our encodings (``bench.core.PairWork``): TRL
would tokenise prompt+response as one string, which can merge tokens across the boundary and make
the two sides train on different ids. DPOTrainer has no pre-tokenised input, so ``_PreTokenizedDPO``
skips its ``_prepare_dataset``; RewardTrainer accepts ``chosen_ids``/``rejected_ids`` as they are.
Both use a sequential sampler (``train_sampling_strategy="sequential"``), so their step k is ours.
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings

import torch
from transformers import TrainerCallback

from alignbench.bench.core import PeakMemory, Setup, Side, copy_model, lm_sequences, model_dir, \
    sampled_tokens, steps, sync, work
from alignbench import formats
from alignbench.models import count_params, pm_from_lm
from alignbench.sampling import STOP, left_pad
from alignbench.encoding import pad_batch
from alignbench.train import autocast


class _CollatorRecorder:
    """Wraps a peer's data collator: records each batch's rows as the model gets them, padding stripped."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, examples):
        out = self.collate(examples)
        ids, attn = out["input_ids"], out["attention_mask"].bool()
        self.batches.append([row[m].tolist() for row, m in zip(ids, attn)])
        return out


class _StepTimer(TrainerCallback):
    """Times each optimiser step of a transformers Trainer into ``side`` (the batch was collated before)."""

    def __init__(self, side: Side, device: torch.device):
        self.side, self.device, self.recorder = side, device, None

    def on_step_begin(self, a, state, control, **kw):
        sync(self.device)
        self.t = time.perf_counter()

    def on_step_end(self, a, state, control, **kw):
        sync(self.device)
        self.side.add_step(time.perf_counter() - self.t, self.recorder.batches[len(self.side.step_seconds)])


def _train(side: Side, make_trainer, device: torch.device) -> Side:
    """Build a TRL trainer (``make_trainer(out_dir, callbacks)``), record its batches, train, time it."""
    timer = _StepTimer(side, device)
    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings(), PeakMemory(device) as mem:
        warnings.simplefilter("ignore", FutureWarning)  # TRL's own deprecation notices, not ours to fix
        t0 = time.perf_counter()
        trainer = make_trainer(out_dir, [timer])
        # wrapped after __init__: the reference pass there is not a training step
        timer.recorder = trainer.data_collator = _CollatorRecorder(trainer.data_collator)
        side.extra["n_params"] = count_params(trainer.model)
        result = trainer.train()
        sync(device)
        wall = time.perf_counter() - t0
    side.extra["mean_loss"] = round(float(result.training_loss), 4)  # TRL reports the mean over the run
    return side.finish(wall, mem.peak_mb)


def _trainer_args(setup: Setup, args, out_dir: str) -> dict:
    """TrainingArguments both TRL trainers share: our batch, steps, lr schedule, clip, precision."""
    cuda = setup.device.type == "cuda"
    return dict(output_dir=out_dir, report_to="none", use_cpu=not cuda, seed=args.seed,
                per_device_train_batch_size=args.batch_size, max_steps=args.steps, num_train_epochs=1,
                learning_rate=args.lr, lr_scheduler_type="cosine", max_grad_norm=1.0, max_length=setup.seq_len,
                activation_checkpointing=False, bf16=setup.precision == "bf16", fp16=False,  # TRL defaults: recompute on,
                # bf16 on (on CPU too, as accelerate's autocast: our side's precision either way)
                train_sampling_strategy="sequential", save_strategy="no", logging_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)


def dpo_trl(setup: Setup, args) -> Side:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class _PreTokenizedDPO(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **kw):  # rows arrive as our token ids (see the module doc)
            return dataset

    rows = [{"prompt_ids": w.chosen.input_ids[:w.chosen.response_start],
             "chosen_ids": w.chosen.input_ids[w.chosen.response_start:],
             "rejected_ids": w.rejected.input_ids[w.rejected.response_start:]}
            for w in work(setup, args, "pairs").items]

    def make(out_dir, callbacks):
        cfg = DPOConfig(**_trainer_args(setup, args, out_dir), beta=args.beta, loss_type="sigmoid",
                        precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size,
                        padding_free=False)  # disabled in TRL 1.16 (see the module doc)
        return _PreTokenizedDPO(model=copy_model(setup), args=cfg, train_dataset=Dataset.from_list(rows),
                                processing_class=setup.tokenizer, callbacks=callbacks)

    return _train(Side("dpo", "trl", "trl.DPOTrainer"), make, setup.device)


def pm_trl(setup: Setup, args) -> Side:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = [{"chosen_ids": w.chosen.input_ids, "rejected_ids": w.rejected.input_ids}
            for w in work(setup, args, "pairs").items]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or model_dir(setup, tmp)

        def make(out_dir, callbacks):
            cfg = RewardConfig(**_trainer_args(setup, args, out_dir), pad_to_multiple_of=None,
                               center_rewards_coefficient=None, disable_dropout=True)
            return RewardTrainer(model=pm_from_lm(path, setup.tokenizer, args.seed).to(setup.device), args=cfg,
                                 train_dataset=Dataset.from_list(rows), processing_class=setup.tokenizer,
                                 callbacks=callbacks)

        return _train(Side("pm", "trl", "trl.RewardTrainer"), make, setup.device)


@torch.no_grad()
def generate_hf(setup: Setup, args) -> Side:
    side = Side("generate", "hf", "transformers generate(do_sample=True)")
    model, tok, dev = copy_model(setup).eval(), setup.tokenizer, setup.device
    # the same stop rule as ours: the end-of-turn token (chat), or EOS and the "\n\nHuman:" stop string (raw)
    eos = formats.end_of_turn_id(tok, setup.fmt)
    stop = {"stop_strings": [STOP], "tokenizer": tok} if setup.fmt == "raw" else {}
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        for s, chunk in enumerate(steps(work(setup, args, "prompts").items, args.batch_size)):
            ids = [p_ids for _, p_ids in chunk]
            input_ids, attn = left_pad(ids, tok.pad_token_id)  # as generate() expects for decoder-only models
            width = input_ids.shape[1]
            torch.manual_seed(args.seed + s)
            t = time.perf_counter()
            with autocast(setup.precision, dev):
                out = model.generate(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), do_sample=True,
                                     max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                     pad_token_id=tok.pad_token_id, eos_token_id=eos, **stop)
            sync(dev)
            seconds = time.perf_counter() - t
            new = out[:, width:].tolist()
            side.add_step(seconds, ids, tokens=sampled_tokens(new, eos, pad=tok.pad_token_id))
        wall = time.perf_counter() - t0
    return side.finish(wall, mem.peak_mb)


def loop_plain(setup: Setup, args) -> Side:
    side = Side("train-loop", "torch", "plain torch loop (HF labels loss)")
    model, dev = copy_model(setup).train(), setup.device
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
        losses = []
        for chunk in steps(lm_sequences(setup, args), args.batch_size):
            t = time.perf_counter()
            b = pad_batch(chunk, setup.tokenizer.pad_token_id, dev)
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            with autocast(setup.precision, dev):
                loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            side.add_step(time.perf_counter() - t, [e.input_ids for e in chunk])
            losses.append(loss.item())
        wall = time.perf_counter() - t0
    return side.finish(wall, mem.peak_mb, losses)
