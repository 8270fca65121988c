"""Train a tiny open_clip CLIP on the emoji image–caption pairs with EMC² negatives in place of open_clip's ClipLoss.

    python examples/open_clip_emoji.py --steps 300                         # one process (GPU if there is one)
    accelerate launch --multi_gpu --num_processes 2 examples/open_clip_emoji.py --smoke    # 2 CPU processes (gloo)

The model is open_clip's ``CLIP`` built from a small config registered with ``open_clip.add_model_config`` (a 2-layer
ViT on 32 px images, a 2-layer text transformer; random init, or ``--checkpoint``).  The changes to an open_clip
training loop: ``ClipLoss()(img, txt, logit_scale)`` becomes ``GlobalContrastiveLoss("emc2", num_samples=N)(img, txt,
index, logit_scale, ...)`` with each pair's dataset index, and EMC²'s chain states (an image for each caption→image
chain, a caption for each image→caption chain) go through the model in the batch's own forward: ``state_request``
names them before the forward, so they get the batch's training transform (seeded by epoch and index, so the chain's
exact view comes back) and train mode.  Under Accelerate each process passes its own rows and indices and the loss
gathers over processes itself (no ``gather_with_grad`` / ``local_loss`` flags).
Needs the emoji files of scripts/install.sh (data_cache/emoji).
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dual_emc2.data.offline_sets import EMOJI_DIR, emoji_pairs
from dual_emc2.loss.global_loss import GlobalContrastiveLoss

MODEL_NAME = "dual-emc2-tiny-clip"


def tiny_clip_config(image_size: int, width: int, layers: int) -> dict:
    """A small open_clip model config: ViT (patch = image_size / 4) and a text transformer with CLIP's BPE vocab."""
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": image_size, "patch_size": image_size // 4, "width": width, "layers": layers,
                       "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": max(1, width // 32),
                     "layers": layers},
    }


def register_config(cfg: dict) -> None:
    path = Path(tempfile.mkdtemp()) / f"{MODEL_NAME}.json"  # open_clip registers a JSON file under its stem
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)


def decode(png: bytes) -> Image.Image:
    """RGB image of an emoji PNG, transparency over white."""
    img = Image.open(io.BytesIO(png)).convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", img.size, "white"), img).convert("RGB")


class EmojiPairs(Dataset):
    """(index, training-transformed image, caption tokens); index = the pair's dataset index.  The image's random
    transform is seeded by (seed, epoch, index), so :meth:`image` can draw any epoch's view again."""

    def __init__(self, images: list[Image.Image], captions: list[str], transform, tokenizer, seed: int = 0) -> None:
        self.images, self.captions, self.transform, self.tokenizer = images, captions, transform, tokenizer
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int, epoch: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            return self.transform(self.images[i])

    def tokens(self, ids: list[int]) -> torch.Tensor:
        return self.tokenizer([self.captions[i] for i in ids])

    def __getitem__(self, i: int):
        return i, self.image(i, self.epoch), self.tokens([i])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--checkpoint", default=None, help="initial weights: a state dict or open_clip's {'state_dict'}")
    ap.add_argument("--save", default=None, help="write {'model', 'loss'} state dicts here at the end")
    ap.add_argument("--data", default=str(EMOJI_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a handful of steps of a tiny model (CPU, seconds)")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.width = 3, 8, 64

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    register_config(tiny_clip_config(args.image_size, args.width, args.layers))
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True) if args.checkpoint else {}
    if ckpt:  # this script's {'model', 'loss'}, open_clip's {'state_dict', ...} or a bare state dict
        state = ckpt.get("model", ckpt.get("state_dict", ckpt))
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})

    pairs = emoji_pairs(args.data)
    images, captions = [decode(png) for png in pairs.x], list(pairs.y)
    n = len(images)  # pair k has dataset index k (pairs.ids is 0..n-1)
    data = EmojiPairs(images, captions, preprocess_train, tokenizer, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    core = accelerator.unwrap_model(model)
    device = accelerator.device

    # the global contrastive loss over all n captions (and all n images), EMC²'s chains in its state
    loss_fn = GlobalContrastiveLoss("emc2", num_samples=n).to(device)
    if "loss" in ckpt:  # resume the chains too
        loss_fn.load_state_dict(ckpt["loss"])

    def encode_images(ids: torch.Tensor) -> torch.Tensor:  # evaluation: images by dataset index, eval transform
        pixels = torch.stack([preprocess_val(images[i]) for i in ids.tolist()]).to(device)
        return core.encode_image(pixels, normalize=True)

    def encode_captions(ids: torch.Tensor) -> torch.Tensor:  # evaluation: captions by dataset index
        return core.encode_text(tokenizer([captions[i] for i in ids.tolist()]).to(device), normalize=True)

    accelerator.print(f"emoji pairs: {n}; {accelerator.num_processes} process(es) × batch {args.batch_size}; "
                      f"model {sum(p.numel() for p in core.parameters()) / 1e6:.2f}M parameters on {device}")
    step, epoch, start = 0, 0, time.time()
    model.train()
    while step < args.steps:
        data.epoch = epoch  # read when the loader's iterator starts (num_workers=0)
        for index, pixels, tokens in loader:
            b = index.numel()
            # the chain states this step needs: images (with this batch's training transform, as drawn in their
            # epoch) for the caption→image chains, captions for the image→caption chains
            need = loss_fn.state_request(index, epoch=epoch)
            state_pixels = [data.image(i, e)[None].to(device) for i, _, e in need.x]
            pixels = torch.cat([pixels, *state_pixels])
            tokens = torch.cat([tokens, data.tokens(need.y.ids.tolist()).to(device)])
            image_features, text_features, logit_scale = model(pixels, tokens)[:3]  # one forward, train mode
            # was: loss = ClipLoss()(image_features, text_features, logit_scale)
            loss = loss_fn(image_features[:b], text_features[:b], index, logit_scale, epoch=epoch,
                           state_x=image_features[b:], state_y=text_features[b:])
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            with torch.no_grad():
                core.logit_scale.clamp_(0, 4.6052)  # ln 100, as open_clip does
            step += 1
            accelerator.print(f"step {step}/{args.steps} loss {loss.item():.4f} batch_objective "
                              f"{float(loss_fn.last_stats['batch_objective']):.4f} "
                              f"beta {logit_scale.item():.2f} states {len(need)} ({time.time() - start:.1f}s)",
                              flush=True)
            if step >= args.steps:
                break
        epoch += 1

    if accelerator.is_main_process:
        core.eval()
        with torch.no_grad():
            ids = torch.arange(min(n, 256))
            img, txt = encode_images(ids), encode_captions(ids)
            r1 = float(((img @ txt.t()).argmax(dim=1).cpu() == ids).float().mean())
        print(f"done: image→caption recall@1 on the first {ids.numel()} training pairs {r1:.4f}", flush=True)
        if args.save:
            torch.save({"model": core.state_dict(), "loss": loss_fn.state_dict()}, args.save)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
