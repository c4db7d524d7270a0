"""Train a Stable Diffusion-style LoRA on a tiny UNet and share it as a kohya file (about a minute on a CPU).

    python examples/diffusion_lora.py [--steps 100] [--out runs/diffusion/lora.safetensors]

The UNet is built from a config (diffusers' own test size), not downloaded. Its "images" are 4×16×16 latents
of two striped patterns, each with its own text embedding; the LoRA (kohya's default targets: attention,
feed-forward and proj_in/out of the transformer blocks) learns to predict the noise added to them: the
epsilon-prediction loss of DDPM, which is what Stable Diffusion LoRAs train on. The file it writes is what
kohya-ss, A1111, ComfyUI and diffusers' ``pipe.load_lora_weights`` read; the script reads it back with
diffusers and checks the noise prediction is the same.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

import lorakit as lk
from lorakit.layers import adapted_layers


SIZE = 16  # latent side: 16×16 keeps a step well under a second on a CPU


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)


def dataset(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two patterns (horizontal and vertical stripes) as latents, and a text embedding for each."""
    ramp = torch.sin(torch.arange(SIZE) * 0.8)
    patterns = torch.stack([ramp[:, None].expand(SIZE, SIZE), ramp[None, :].expand(SIZE, SIZE)])
    latents = patterns[:, None].expand(2, 4, SIZE, SIZE).contiguous()
    prompts = torch.randn(2, 7, 32, generator=generator)
    return latents, prompts


def denoising_loss(unet, scheduler, latents, prompts, generator) -> torch.Tensor:
    """DDPM's epsilon-prediction loss on a batch of noised latents at random timesteps."""
    batch = 4
    index = torch.randint(0, len(latents), (batch,), generator=generator)
    clean, text = latents[index], prompts[index]
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    return F.mse_loss(unet(noisy, timesteps, text).sample, noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="runs/diffusion/lora.safetensors")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=1000)
    base = copy.deepcopy(unet).eval()
    latents, prompts = dataset(generator)
    lk.adapt(unet, lk.LoRA(rank=args.rank, alpha=args.rank), targets="kohya")
    trainable = sum(p.numel() for p in lk.trainable_parameters(unet))
    layers = len(adapted_layers(unet))
    print(f"LoRA r={args.rank} on {layers} layers (kohya's default targets): {trainable:,} trainable parameters")
    optimizer = torch.optim.AdamW(lk.trainable_parameters(unet), lr=3e-3)
    evaluation = torch.Generator().manual_seed(1)  # the same noised batches before and after
    with torch.no_grad():
        before = sum(denoising_loss(unet.eval(), scheduler, latents, prompts, evaluation.manual_seed(1)).item()
                     for _ in range(4)) / 4
    start = time.perf_counter()
    unet.train()
    for step in range(1, args.steps + 1):
        loss = denoising_loss(unet, scheduler, latents, prompts, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    unet.eval()
    with torch.no_grad():
        after = sum(denoising_loss(unet, scheduler, latents, prompts, evaluation.manual_seed(1)).item()
                    for _ in range(4)) / 4
    print(f"denoising loss on fixed noised batches: {before:.4f} -> {after:.4f} "
          f"({args.steps} steps, {time.perf_counter() - start:.0f} s)")

    path = lk.save(unet, args.out, format="kohya")
    print(f"kohya LoRA written to {path} (A1111 / ComfyUI / kohya-ss read it as is)")

    # diffusers reads the file onto the base UNet: the same noise prediction as ours.
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, base)
    noisy = torch.randn(2, 4, SIZE, SIZE, generator=generator)
    with torch.no_grad():
        ours, theirs = unet(noisy, torch.tensor([500, 500]), prompts).sample, base(noisy, torch.tensor([500, 500]), prompts).sample
    print(f"diffusers' reading of the file vs ours: max |difference| {(ours - theirs).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
