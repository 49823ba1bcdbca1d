"""CUDA paths, checked against the CPU: LoRA in fp32 and bf16, NF4 on bitsandbytes' CUDA kernels,
training steps, and the serving engine. Marked ``cuda`` (``make gpu-check`` runs them with
``pytest -m cuda``); skipped where no CUDA device exists."""
from __future__ import annotations

import copy

import pytest
import torch

from deltatune import LoraConfig, get_peft_model
from tests.conftest import tiny_llama

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model():
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))


def test_lora_logits_and_grads_on_cuda_match_cpu():
    cpu = _lora_model()
    gpu = copy.deepcopy(cpu).cuda()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    out_cpu = cpu(input_ids=ids, labels=ids)
    out_gpu = gpu(input_ids=ids.cuda(), labels=ids.cuda())
    torch.testing.assert_close(out_gpu.logits.cpu(), out_cpu.logits, atol=1e-4, rtol=1e-4)
    out_cpu.loss.backward()
    out_gpu.loss.backward()
    grads_cpu = {n: p.grad for n, p in cpu.named_parameters() if p.requires_grad}
    grads_gpu = {n: p.grad.cpu() for n, p in gpu.named_parameters() if p.requires_grad}
    assert grads_cpu.keys() == grads_gpu.keys() and grads_cpu
    for name, g in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], g, atol=1e-4, rtol=1e-3, msg=name)


def test_bf16_autocast_on_cuda_stays_close_to_fp32():
    model = _lora_model().cuda()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(input_ids=ids).logits.float()
    assert float((low - ref).norm() / ref.norm()) < 0.05


def test_training_steps_on_cuda_lower_the_loss():
    model = _lora_model().cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3)).cuda()
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_nf4_on_cuda_dequantizes_like_the_cpu_and_matches_its_forward():
    pytest.importorskip("bitsandbytes")
    from deltatune import quantize
    from deltatune.quant import dense_weight

    torch.manual_seed(0)
    cpu = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
    gpu = copy.deepcopy(cpu).cuda()
    dense = cpu[0].weight.detach().clone()                             # (64, 128)
    quantize(cpu)
    quantize(gpu, compute_dtype=torch.float32)
    w_cpu, w_gpu = dense_weight(cpu[0]), dense_weight(gpu[0]).cpu()   # (64, 128)
    # bnb's CPU and CUDA kernels implement one algorithm; a rounding tie may land apart, nothing more
    assert float(((w_gpu - w_cpu).abs() < 1e-6).float().mean()) > 0.99
    assert float((w_gpu - dense).norm() / dense.norm()) < 0.15          # NF4's error, not garbage
    x = torch.randn(8, 128)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), x @ w_gpu.T, atol=1e-4, rtol=1e-4)


def test_engine_on_cuda_gives_hf_greedy_tokens(tmp_path):
    from tests.serving_fixtures import make_base
    from transformers import AutoModelForCausalLM

    from deltatune.serving import Engine, SamplingParams

    base = make_base(tmp_path / "base")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    hf = AutoModelForCausalLM.from_pretrained(base).cuda().eval()
    want = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]).cuda(), max_new_tokens=6, min_new_tokens=6, do_sample=False)
            want.append(out[0, len(p):].tolist())
    with Engine(str(base), device="cuda", dtype=torch.float32, max_num_seqs=4, max_model_len=64) as engine:
        got = engine.generate(prompts, sampling=SamplingParams(temperature=0, max_tokens=6, min_tokens=6))
    assert [o.outputs[0].token_ids for o in got] == want
