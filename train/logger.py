"""Run logging on rank 0: a tqdm progress bar, wandb (offline by default) and plain printed lines."""
from __future__ import annotations

import os

from .config import Config, config_to_dict

# train.eval_metric=grounding (train/step.py evaluate)
GROUNDING_KEYS = ("acc50", "miou", "point_acc", "box_loss", "box_loss_blind")


class Logger:
    """tqdm bar (loss, tokens/s, lr, ETA) + wandb (offline by default) + plain lines; rank 0 only."""

    def __init__(self, cfg: Config, rank: int, start_step: int):
        self.rank, self.cfg = rank, cfg
        self.bar, self.wandb = None, None
        if rank != 0:
            return
        if cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc=cfg.name, dynamic_ncols=True)
        if cfg.logging.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name or cfg.name,
                                    mode=cfg.logging.wandb_mode, dir=cfg.train.out_dir, config=config_to_dict(cfg))

    def step(self, step: int, metrics: dict, lr: float, tok_s: float):
        """Advance the bar; log metrics to wandb every step and print every `train.log_every` steps."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}")
        if self.wandb is not None:
            self.wandb.log({"train/loss": metrics["loss"], "train/lr": lr, "train/tokens_per_s": tok_s,
                            "train/grad_norm": metrics["grad_norm"], "train/aux_loss": metrics["aux_loss"]}, step=step)
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            self.print(f"step {step:5d}/{self.cfg.train.steps}  loss {metrics['loss']:.4f}  lr {lr:.2e}  "
                       f"grad_norm {metrics['grad_norm']:.3f}  tok/s {tok_s:.0f}")

    def eval(self, step: int, res: dict):
        """Print and log one validation result (loss, CER, grounding metrics if any, a few examples)."""
        if self.rank != 0:
            return
        cer = "n/a" if res["cer"] is None else f"{res['cer']:.4f}"
        ex = "  ".join(f"{p!r}->{r!r}" for p, r in res["examples"][:3])
        grounding = "".join(f"  {k} {res[k]:.4f}" for k in GROUNDING_KEYS if k in res)
        self.print(f"eval step {step:5d}  val_loss {res['val_loss']:.4f}  cer {cer}{grounding}  {ex}")
        if self.wandb is not None:
            d = {"val/loss": res["val_loss"], **{f"val/{k}": res[k] for k in GROUNDING_KEYS if k in res}}
            if res["cer"] is not None:
                d["val/cer"] = res["cer"]
            self.wandb.log(d, step=step)

    def print(self, msg: str):
        """Print on rank 0 without breaking the progress bar."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        """Close the bar and finish the wandb run."""
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
