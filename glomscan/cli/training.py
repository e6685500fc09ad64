"""For the people who (re)train models: ``prepare``, ``synth-slides`` and ``train segment |
inpaint | masks``."""

from __future__ import annotations

from pathlib import Path

import click

from ..augment.settings import GENERATOR_UPSAMPLING, InpaintSettings, MaskGanSettings
from ..train.settings import PrepareSettings, SegmentSettings, VerifierSettings
from .common import default, fail_on, is_quiet, load_model_or_exit, model_option, seed_option, verbosity

EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
NEW_FILE = click.Path(dir_okay=False, path_type=Path)


def _epochs_option(default: int):
    return click.option("--epochs", type=int, default=default, show_default=True, help="Training epochs.")


def _batch_size_option(default: int):
    return click.option("--batch-size", type=int, default=default, show_default=True,
                        help="Samples per training step.")


def _max_steps_option():
    return click.option("--max-steps-per-epoch", type=int, default=None,
                        help="Stop each epoch after this many steps (default: one pass over the training set).")


def _device_option():
    return click.option("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available).")


def _out_option(what: str, metrics: str = "OUT.metrics.csv"):
    return click.option("--out", "out_path", type=NEW_FILE, required=True,
                        help=f"{what}; OUT.last.pt (resume state) and {metrics} are written next to it.")


@click.command(short_help="Build a training set from annotated slides, tiles and crops.")
@click.option("--slides", "slides_dir", type=EXISTING_DIR, default=None,
              help="Annotated slides (with --annotations).")
@click.option("--annotations", "annotations_dir", type=EXISTING_DIR, default=None,
              help="Per slide: <stem>.geojson (QuPath), <stem>_labels.png, or <stem>_normal.png + <stem>_sclerosed.png.")
@click.option("--tiles", "tiles_dir", type=EXISTING_DIR, default=None,
              help="Tile set: images/<name> + masks/<name> (binary glomerulus masks, class unknown).")
@click.option("--tiles-mpp", type=float, default=default(PrepareSettings, "tiles_mpp"), show_default=True, help="µm/px of the tile set's images.")
@click.option("--crops", "crops_dir", type=EXISTING_DIR, default=None,
              help="Glomerulus crop set: labels.csv (image, slide, globally_sclerosed) + images/ + masks/; "
                   "composited into the tile set's tissue.")
@click.option("--composite-uses", type=int, default=default(PrepareSettings, "composite_uses"), show_default=True,
              help="Times each training crop is pasted (each time another size, place and stain).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the prepared set (images/, masks/, manifest.csv).")
@click.option("--tile", type=int, default=default(PrepareSettings, "tile"), show_default=True, help="Patch side cut from slides (analysis px).")
@click.option("--stride", type=int, default=default(PrepareSettings, "stride"), show_default=True, help="Patch stride on slides (analysis px).")
@click.option("--target-mpp", type=float, default=default(PrepareSettings, "target_mpp"), show_default=True, help="Analysis resolution, µm/px.")
@click.option("--downsample", type=float, default=default(PrepareSettings, "downsample"), show_default=True, help="For slides without mpp.")
@click.option("--val-fraction", type=float, default=default(PrepareSettings, "validation_fraction"), show_default=True,
              help="Share of slides (and tile groups) for validation.")
@click.option("--class-map", default=None,
              help='QuPath class names, e.g. "Glomerulus=normal,Sclerotic=sclerosed,Other=ignore" (default: common names).')
@seed_option()
@verbosity
def prepare(slides_dir, annotations_dir, tiles_dir, tiles_mpp, crops_dir, composite_uses, out_dir, tile, stride,
            target_mpp, downsample, val_fraction, class_map, seed):
    """Build a training set (patches + label masks + manifest.csv) from annotated slides, tile sets
    with glomerulus masks, and graded glomerulus crops composited into tissue."""
    from ..train.dataset.data import AnnotationError, parse_class_map, prepare_dataset
    from ..train.dataset.sources import SourceError

    try:
        settings = PrepareSettings(target_mpp=target_mpp, downsample=downsample, tile=tile, stride=stride,
                                   validation_fraction=val_fraction, seed=seed, class_map=parse_class_map(class_map),
                                   tiles_mpp=tiles_mpp, composite_uses=composite_uses)
        manifest = prepare_dataset(slides_dir, annotations_dir, out_dir, settings, tiles_dir=tiles_dir,
                                   crops_dir=crops_dir)
    except (AnnotationError, SourceError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    counts = manifest.groupby(["kind", "split"]).size().to_dict()
    click.echo(f"wrote {len(manifest)} patches to {out_dir} ({counts}); manifest {out_dir / 'manifest.csv'}")


@click.command("synth-slides", short_help="Write synthetic training slides with QuPath outlines.")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=int, default=10, show_default=True,
              help="Number of synthetic slides.")
@seed_option()
@verbosity
def synth_slides(out_dir, count, seed):
    """Write synthetic training slides (OUT/slides/*.tif) with QuPath GeoJSON annotations
    (OUT/annotations/*.geojson)."""
    from ..synthetic import write_training_slides

    write_training_slides(out_dir, count, seed)
    click.echo(f"wrote {count} slides and annotations under {out_dir}")


@click.group(short_help="Train the U-Net, the inpainting GAN or the mask DCGAN.")
def train():
    """Train models: the segmentation U-Net, the inpainting GAN, the mask DCGAN. Each resumes
    from OUT.last.pt when it exists."""


@train.command("verifier", short_help="Train the candidate verifier (second stage) on a prepared set.")
@click.option("--data", "dataset_dir", type=EXISTING_DIR, required=True, help="Set made by 'glomscan prepare'.")
@model_option("Segmentation model whose candidates are mined as hard negatives (default: the shipped model).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder: verifier.onnx (the verifier file), verifier.pt (best state), verifier.last.pt (resume), "
                   "verifier.metrics.csv, and the cached samples (mined.csv, samples.csv, contexts.npy).")
@_epochs_option(default(VerifierSettings, "epochs"))
@_batch_size_option(default(VerifierSettings, "batch_size"))
@click.option("--lr", type=float, default=default(VerifierSettings, "lr"), show_default=True,
              help="Peak learning rate (one-cycle schedule).")
@click.option("--mining-threshold", type=float, default=default(VerifierSettings, "mining_threshold"),
              show_default=True, help="Mine segmentation components of max class probability >= this that match "
                                      "no outline (0: no mining, random tissue negatives only).")
@click.option("--hard-negative-weight", type=float, default=default(VerifierSettings, "hard_negative_weight"),
              show_default=True, help="Loss weight of the mined negatives and the boxes around them.")
@click.option("--stain-jitter", type=float, default=default(VerifierSettings, "stain_jitter"), show_default=True,
              help="Per-sample optical-density gain, shift and saturation jitter.")
@click.option("--hard-negatives/--no-hard-negatives", default=True, show_default=True,
              help="Train on the mined negatives (--no-hard-negatives: random tissue boxes only, to measure them).")
@click.option("--samples-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the mined and cut samples are cached (default: OUT); runs sharing it cut them once.")
@click.option("--hold-out-groups", default="", help="Comma-separated tile groups left out (cross-validation).")
@click.option("--also-mine-with", "also_mine_with", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Another segmentation model whose false candidates are mined too (e.g. the model --model "
                   "replaces); repeatable.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]), default="auto",
              show_default=True, help="Inference backend of the segmentation model while mining.")
@click.option("--name", default="glomscan-verifier", show_default=True, help="Name in the verifier's card.")
@click.option("--trained-on", default="", help="Card: what it was trained on.")
@click.option("--licence", default="", help="Card: terms the weights inherit from the training data.")
@click.option("--intended-use", default="research use only; not a medical device", show_default=True,
              help="Card: intended use.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="auto: fp16 on CUDA, bf16 on CPUs with bf16 instructions, else fp32.")
@_device_option()
@seed_option()
@verbosity
@fail_on(ValueError)
def train_verifier(dataset_dir, model_path, out_dir, epochs, batch_size, lr, mining_threshold, hard_negative_weight,
                   stain_jitter, hard_negatives, samples_dir, hold_out_groups, also_mine_with, backend, name, trained_on, licence, intended_use, precision, device,
                   seed):
    """Train the candidate verifier: a ResNet-18 on crops framed on each candidate, three classes
    (not a glomerulus, normal, globally sclerosed), from the outlined glomeruli of a prepared set,
    random tissue boxes and the segmentation model's mined false candidates (hard negatives).
    Resumes from OUT/verifier.last.pt."""
    from ..train.fit.verifier import make_verifier
    from ..verify import VerifierCard

    settings = VerifierSettings(epochs=epochs, batch_size=batch_size, lr=lr, mining_threshold=mining_threshold,
                                hard_negative_weight=hard_negative_weight, hard_negatives=hard_negatives,
                                stain_jitter=stain_jitter, seed=seed,
                                precision=precision, device=device)
    segmentation = load_model_or_exit(model_path) if mining_threshold > 0 else None
    card = VerifierCard(name=name, trained_on=trained_on, licence=licence, intended_use=intended_use)
    groups = tuple(g.strip() for g in hold_out_groups.split(",") if g.strip())
    others = tuple(load_model_or_exit(p) for p in also_mine_with) if segmentation is not None else ()
    path, best = make_verifier(dataset_dir, out_dir, segmentation, settings, card, backend, groups, quiet=is_quiet(),
                               samples_dir=samples_dir, also_mine_with=others)
    click.echo(f"best epoch {best.get('epoch')}: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()
                                                              if isinstance(v, float)))
    click.echo(f"-> {path}")


@train.command("segment", short_help="Train the segmentation U-Net.")
@click.option("--data", "dataset_dir", type=EXISTING_DIR, required=True, help="Set made by 'glomscan prepare'.")
@_out_option("Best checkpoint")
@_epochs_option(default(SegmentSettings, "epochs"))
@_batch_size_option(default(SegmentSettings, "batch_size"))
@click.option("--lr", type=float, default=default(SegmentSettings, "lr"), show_default=True,
              help="Adam learning rate at the start (cosine schedule).")
@click.option("--min-lr", type=float, default=default(SegmentSettings, "min_lr"), show_default=True,
              help="Learning rate at the end of the cosine schedule.")
@click.option("--crop", type=int, default=None, help="Random training crops of this side (CPU-friendly).")
@click.option("--encoder", default=default(SegmentSettings, "encoder"), show_default=True,
              help="smp encoder of the U-Net.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local encoder state dict (no downloads).")
@_max_steps_option()
@click.option("--bn-recalibration-steps", type=int, default=default(SegmentSettings, "bn_recalibration_steps"), show_default=True,
              help="Exact BatchNorm statistics over this many batches before each validation (0: off).")
@click.option("--name", default=default(SegmentSettings, "name"), show_default=True,
              help="Model name recorded in the card.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default=default(SegmentSettings, "precision"), show_default=True,
              help="auto: fp16 autocast on CUDA, bf16 autocast + channels_last on CPUs with bf16 instructions, else fp32.")
@_device_option()
@click.option("--tile", "card_tile", type=int, default=None,
              help="Analysis tile the model card records (default: the patch size of the set).")
@click.option("--stain-jitter", type=float, default=default(SegmentSettings, "stain_jitter"), show_default=True,
              help="Whole-patch stain augmentation: optical density gain 1 +- this.")
@click.option("--jpeg-min-quality", type=click.IntRange(1, 95), default=None,
              help="JPEG augmentation: half the patches compressed (4:2:0 chroma, as scanners do) at a quality "
                   "drawn from [this, 95].")
@click.option("--init", "init_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from this glomscan checkpoint's weights (fine-tuning) instead of random ones.")
@click.option("--workers", type=click.IntRange(min=0), default=default(SegmentSettings, "workers"), show_default=True,
              help="Processes that load and augment patches while the model trains (0: in the training process).")
@click.option("--data-on-device", is_flag=True,
              help="Hold the training patches on the training device (a GPU) and cut and augment every batch there "
                   "(stain jitter also shifts optical density and saturation); no loader processes.")
@click.option("--scale-jitter", type=click.FloatRange(0, 1), default=default(SegmentSettings, "scale_jitter"),
              show_default=True,
              help="With --data-on-device: each batch magnified by a factor between 1/(1+this) and 1+this.")
@seed_option()
@verbosity
@fail_on(ValueError)
def train_segment(dataset_dir, out_path, epochs, batch_size, lr, min_lr, crop, encoder, encoder_weights,
                  max_steps_per_epoch, bn_recalibration_steps, name, precision, device, card_tile, stain_jitter,
                  jpeg_min_quality, init_path, workers, data_on_device, scale_jitter, seed):
    """Train the U-Net (0.5*BCE + Dice, Adam, cosine LR); resumes from OUT.last.pt if present."""
    from ..train.fit.segment import train_segmentation

    settings = SegmentSettings(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, crop=crop, encoder=encoder,
                               encoder_weights=encoder_weights, max_steps_per_epoch=max_steps_per_epoch,
                               bn_recalibration_steps=bn_recalibration_steps, name=name, seed=seed,
                               precision=precision, device=device, stain_jitter=stain_jitter, tile=card_tile,
                               workers=workers, jpeg_min_quality=jpeg_min_quality, init=init_path,
                               data_on_device=data_on_device, scale_jitter=scale_jitter)
    best = train_segmentation(dataset_dir, out_path, settings, quiet=is_quiet())
    click.echo(f"best validation Dice {best.get('dice_mean', float('nan')):.4f} -> {out_path}")


@train.command("inpaint", short_help="Train the inpainting GAN on glomerulus crops.")
@click.option("--crops", "crops_dir", type=EXISTING_DIR, required=True,
              help="Crops folder made by 'glomscan augment crops'.")
@_out_option("Generator file (samples in OUT.samples/)")
@_epochs_option(default(InpaintSettings, "epochs"))
@_batch_size_option(default(InpaintSettings, "batch_size"))
@click.option("--lr", type=float, default=default(InpaintSettings, "lr"), show_default=True,
              help="Adam learning rate of the generator and both discriminators.")
@click.option("--lr-decay-after-epoch", type=int, default=default(InpaintSettings, "lr_decay_after_epoch"),
              help="Keep --lr up to this epoch, then let it fall along a half cosine to 0 at the last epoch "
                   "(not in the paper; default: constant).")
@click.option("--size", type=int, default=None, help="Train at this crop side (resized; CPU-friendly, e.g. 128).")
@click.option("--base-channels", type=int, default=default(InpaintSettings, "base_channels"), show_default=True,
              help="Width of the first convolution layer (network size).")
@click.option("--upsampling", type=click.Choice(GENERATOR_UPSAMPLING), default=default(InpaintSettings, "upsampling"),
              show_default=True, help="Decoder x2 upsampling: bilinear + conv, or transposed conv (the older generators).")
@click.option("--lambda-local-l1", type=float, default=default(InpaintSettings, "lambda_local_l1"), show_default=True, help="Weight of the local L1 loss.")
@click.option("--vgg-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local torchvision VGG19 state dict for the perceptual/style losses (without it they are off).")
@click.option("--feature-model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Or a glomscan segmentation model file: its encoder (kidney tissue features) is the feature network.")
@click.option("--style-weight", type=float, default=default(InpaintSettings, "style_weight"), show_default=True,
              help="Weight of the style loss (the paper's 150 is set for VGG19's activations).")
@click.option("--ssim-weight", type=float, default=default(InpaintSettings, "ssim_weight"), show_default=True,
              help="Weight of 1 - SSIM inside the mask (not in the paper; 0 = off).")
@click.option("--ema-decay", type=float, default=default(InpaintSettings, "ema_decay"), show_default=True,
              help="Save and evaluate a moving average of the generator's weights with this per-step decay "
                   "(e.g. 0.98; not in the paper; 0 = off).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default=default(InpaintSettings, "precision"), show_default=True,
              help="CPU training precision (auto: bf16 where the CPU has bf16 instructions); CUDA uses fp16 AMP.")
@click.option("--augment/--no-augment", default=default(InpaintSettings, "augment"), show_default=True, help="Random flips and 90° rotations.")
@_max_steps_option()
@_device_option()
@seed_option()
@verbosity
@fail_on(ValueError, FileNotFoundError)
def train_inpaint(crops_dir, out_path, epochs, batch_size, lr, lr_decay_after_epoch, size, base_channels, upsampling,
                  lambda_local_l1, vgg_weights, feature_model, style_weight, ssim_weight, ema_decay, precision, augment,
                  max_steps_per_epoch, device, seed):
    """Train the inpainting GAN (AOT generator, global + local LSGAN discriminators); resumes
    from OUT.last.pt if present."""
    from ..augment.inpaint import train_inpainting

    settings = InpaintSettings(epochs=epochs, batch_size=batch_size, lr=lr, lr_decay_after_epoch=lr_decay_after_epoch,
                               size=size, base_channels=base_channels,
                               upsampling=upsampling,
                               lambda_local_l1=lambda_local_l1, vgg_weights=vgg_weights,
                               feature_model=feature_model, style_weight=style_weight, ssim_weight=ssim_weight,
                               ema_decay=ema_decay,
                               precision=precision,
                               augment=augment,
                               max_steps_per_epoch=max_steps_per_epoch, device=device, seed=seed)
    row = train_inpainting(crops_dir, out_path, settings, quiet=is_quiet())
    if row:
        click.echo(f"epoch {row['epoch']}: held-out MAE {row['test_mae']:.4f}, PSNR {row['test_psnr']:.2f} dB, "
            f"SSIM {row['test_ssim']:.3f} -> {out_path}")


@train.command("masks", short_help="Train the mask DCGAN on glomerulus outlines.")
@click.option("--crops", "crops_dir", type=EXISTING_DIR, required=True,
              help="Crops folder made by 'glomscan augment crops' (their outlines are the training masks).")
@_out_option("Generator file (samples in OUT.samples.png)", metrics="OUT.metrics.csv")
@_epochs_option(default(MaskGanSettings, "epochs"))
@_batch_size_option(default(MaskGanSettings, "batch_size"))
@click.option("--image-size", type=click.Choice(["64", "128"]), default=str(default(MaskGanSettings, "image_size")), show_default=True,
              help="Side of the generated masks, px.")
@click.option("--latent", type=int, default=default(MaskGanSettings, "latent"), show_default=True,
              help="Size of the DCGAN's latent vector.")
@click.option("--base-channels", type=int, default=default(MaskGanSettings, "base_channels"), show_default=True,
              help="Width of the first convolution layer (network size).")
@click.option("--lr", type=float, default=default(MaskGanSettings, "lr"), show_default=True,
              help="Adam learning rate.")
@_max_steps_option()
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="train", show_default=True,
              help="Which part of the crops folder to use.")
@_device_option()
@seed_option()
@verbosity
@fail_on(ValueError, FileNotFoundError)
def train_masks(crops_dir, out_path, epochs, batch_size, image_size, latent, base_channels, lr, max_steps_per_epoch,
                split, device, seed):
    """Train the mask DCGAN on the crops' glomerulus masks; resumes from OUT.last.pt if present."""
    from ..augment.crops import read_crops
    from ..augment.maskgan import train_mask_gan

    masks = [m for _, m in read_crops(crops_dir, None if split == "all" else split)]
    settings = MaskGanSettings(epochs=epochs, batch_size=batch_size, image_size=int(image_size), latent=latent,
                               base_channels=base_channels, lr=lr, steps_per_epoch=max_steps_per_epoch, device=device,
                               seed=seed)
    history = train_mask_gan(masks, out_path, settings, quiet=is_quiet(), info={"crops": str(crops_dir)})
    last = history[-1] if history else {}
    click.echo(f"trained on {len(masks)} masks, epoch {last.get('epoch', 0)}: loss D {last.get('loss_d', float('nan')):.4f}, "
        f"G {last.get('loss_g', float('nan')):.4f} -> {out_path} (metrics {out_path.with_suffix('.metrics.csv')}, "
        f"samples {out_path.with_suffix('.samples.png')})")


COMMANDS = (prepare, synth_slides, train)
