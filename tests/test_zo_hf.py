"""diffkern.integrations.ZOTrainer: the Hugging Face Trainer with ZOSGD steps, and PEFT.

Tiny models built from a config (hidden 32, 2 layers, vocab 128; no download). The toy task:
sequences that repeat a 4-token pattern drawn from 8 tokens. transformers / peft are
optional: these tests skip without them (except the ImportError message test).
"""
import copy
import importlib
import sys

import pytest
import torch

import diffkern as dk

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: on a shared CPU, several threads spin against each other and a step costs
    # ~50x more; one thread keeps the file at a few seconds.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def need_hf():
    """transformers and accelerate (its Trainer's dependency), or skip."""
    pytest.importorskip("accelerate")
    return pytest.importorskip("transformers")


def bits(model):
    return {n: p.detach().view(_INT[p.dtype]).clone() for n, p in model.named_parameters()}


def toy_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (n, 4), generator=g).repeat(1, 4)
    return dict(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids))


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n, seed=1):
        self.data = toy_batches(n, seed)

    def __len__(self):
        return len(self.data["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def tiny_opt(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 word_embed_proj_dim=32, max_position_embeddings=64,
                                 dropout=0.0, attention_dropout=0.0)
    return transformers.OPTForCausalLM(cfg)


def args(tmp_path, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=30,
                learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=10,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def eval_loss(model, batch):
    with torch.no_grad():
        return float(model(**batch).loss)


class Recording:
    """A ZOTrainer subclass factory that records each micro-batch the Trainer feeds, and the
    num_items_in_batch it passes, so the test can replay them by hand."""

    @staticmethod
    def make():
        from diffkern.integrations import ZOTrainer

        class RecordingTrainer(ZOTrainer):
            def __init__(self, *a, **kw):
                self.seen = []
                super().__init__(*a, **kw)

            def training_step(self, model, inputs, num_items_in_batch=None, *a, **kw):
                self.seen.append(({k: v.clone() for k, v in inputs.items()},
                                  num_items_in_batch))
                return super().training_step(model, inputs, num_items_in_batch, *a, **kw)
        return RecordingTrainer


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_loss_goes_down(tmp_path, build):
    need_hf()
    from diffkern.integrations import ZOTrainer
    model = build()
    held_out = toy_batches(64, seed=7)
    before = eval_loss(model, held_out)
    trainer = ZOTrainer(model=model, args=args(tmp_path), train_dataset=ToyData(480),
                        zo_num_directions=4)
    out = trainer.train()
    after = eval_loss(model, held_out)
    assert out.global_step == 30
    assert after < before - 0.1, (before, after)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(logged)))


def test_peft_lora_only_adapters_change(tmp_path):
    need_hf()
    peft = pytest.importorskip("peft")
    from diffkern.integrations import ZOTrainer
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = bits(model)
    trainer = ZOTrainer(model=model, args=args(tmp_path, max_steps=5, learning_rate=1e-2),
                        train_dataset=ToyData(80))
    trainer.train()
    after = bits(model)
    for n in before:
        if n in trainable:
            assert not torch.equal(before[n], after[n]), f"LoRA weight {n} did not change"
        else:
            assert torch.equal(before[n], after[n]), f"frozen weight {n} changed"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_matches_zosgd_by_hand(tmp_path, accumulation):
    transformers = need_hf()
    model = tiny_opt()
    start = copy.deepcopy(model)
    steps = 6
    trainer = Recording.make()(
        model=model, args=args(tmp_path, max_steps=steps, per_device_train_batch_size=8,
                               gradient_accumulation_steps=accumulation, weight_decay=0.01,
                               lr_scheduler_type="linear", warmup_steps=2),
        train_dataset=ToyData(8 * steps * accumulation), zo_num_directions=2, zo_seed=123)
    trainer.train()
    assert len(trainer.seen) == steps * accumulation

    # By hand: the same seed, lr schedule and micro-batches; the loss of a perturbation is the
    # accumulated Trainer loss, here written with the model's own num_items_in_batch option.
    hand = start
    opt = dk.zo.ZOSGD(hand, lr=5e-3, weight_decay=0.01, num_directions=2, seed=123)
    sched = transformers.get_linear_schedule_with_warmup(opt, 2, steps)
    hand.eval()
    for s in range(steps):
        micro = trainer.seen[s * accumulation:(s + 1) * accumulation]

        def closure():
            total = 0.0
            for batch, items in micro:
                if items is None:
                    total = total + hand(**batch).loss.float() / len(micro)
                else:
                    total = total + hand(**batch, num_items_in_batch=items).loss.float()
            return total
        opt.step(closure)
        sched.step()
    a, b = bits(model), bits(hand)
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs from the hand-driven ZOSGD"


def test_rejects_other_optimizers(tmp_path):
    need_hf()
    from diffkern.integrations import TrainerZOSGD, ZOTrainer
    model = tiny_opt()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="TrainerZOSGD"):
        ZOTrainer(model=model, args=args(tmp_path), train_dataset=ToyData(16),
                  optimizers=(sgd, None))
    with pytest.raises(ValueError, match="eps"):
        ZOTrainer(model=model, args=args(tmp_path), train_dataset=ToyData(16), zo_eps=0.0)
    own = TrainerZOSGD(model, lr=1e-3, seed=0)
    assert own.step() is None  # the Trainer's closure-less call after a ZO step


def test_missing_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    monkeypatch.delitem(sys.modules, "diffkern.integrations.transformers_zo", raising=False)
    with pytest.raises(ImportError, match="pip install transformers"):
        importlib.import_module("diffkern.integrations.transformers_zo")
    import diffkern.integrations as integ
    with pytest.raises(ImportError, match="pip install transformers"):
        integ.ZOTrainer


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    # The checkpoint holds the weights and TrainerZOSGD's state (step counter, seed): resuming
    # at step 3 of 6 regenerates the directions of steps 4-6 and ends on the same bits.
    need_hf()
    from diffkern.integrations import ZOTrainer
    kw = dict(max_steps=6, per_device_train_batch_size=8, save_strategy="steps", save_steps=3,
              learning_rate=1e-2)
    full = tiny_opt()
    ZOTrainer(model=full, args=args(tmp_path / "full", **kw), train_dataset=ToyData(48),
              zo_num_directions=2).train()
    resumed = tiny_opt(seed=99)  # other initial weights: the checkpoint must replace them
    ZOTrainer(model=resumed, args=args(tmp_path / "full", **kw), train_dataset=ToyData(48),
              zo_num_directions=2).train(resume_from_checkpoint=str(tmp_path / "full" /
                                                                    "checkpoint-3"))
    a, b = bits(full), bits(resumed)
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs after resuming"
