#!/usr/bin/env bash
# Fetch checkpoints into ckpts/ (or $ASI_CKPT_DIR) on a machine with internet:
#
#   bash scripts/download_ckpts.sh setupB     the paper's released setup-B classification checkpoints
#                                              (Google Drive id from the original repository README, via gdown)
#   bash scripts/download_ckpts.sh imagenet   the published ImageNet weights of every model in the zoo
#                                              (MCUNet release, torchvision) -> ckpts/imagenet/, used by
#                                              --model.pretrained true when offline
#   bash scripts/download_ckpts.sh seg        the authors' Cityscapes-calibrated segmentation checkpoints (mmseg format,
#                                              Google Drive id from the original README) -> ckpts/segmentation/authors/
#   bash scripts/download_ckpts.sh all        setupB and imagenet (default)
#
# Copy ckpts/ to an offline machine afterwards; see ckpts/README.md for what goes where.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CKPTS="${ASI_CKPT_DIR:-$REPO/ckpts}"
PYTHON="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
WHAT="${1:-all}"

# The paper's classification checkpoints for setup B (pretrained on ImageNet half 1): original README, step 2.
SETUPB_GDRIVE_ID="1N2lOOxaepwbEuwIi7xEEBZwov8pb3jEJ"
SETUPB_ARCHIVE="cls_pretrained_ckpts.tar.gz"

fetch_setupB() {
    mkdir -p "$CKPTS/paper"
    echo "downloading $SETUPB_ARCHIVE (Google Drive id $SETUPB_GDRIVE_ID) into $CKPTS/paper/"
    "$PYTHON" -m gdown "https://drive.google.com/uc?id=$SETUPB_GDRIVE_ID" -O "$CKPTS/paper/$SETUPB_ARCHIVE"
    tar xzf "$CKPTS/paper/$SETUPB_ARCHIVE" -C "$CKPTS/paper"
    rm -f "$CKPTS/paper/$SETUPB_ARCHIVE"
    echo "extracted checkpoints:"
    find "$CKPTS/paper" -type f \( -name '*.ckpt' -o -name '*.pth' -o -name '*.pt' \) | sort
    echo "fine-tune one of them on ImageNet half 2 with, e.g.:"
    echo "  python main.py fit --config configs/recipes/setupB_finetune.yaml --config configs/models/mcunet.yaml \\"
    echo "      --config configs/data/imagenet.yaml --config configs/methods/asi.yaml --model.checkpoint <file above>"
}

# The authors' segmentation checkpoints (original README, "Segmentation", step 3): one mmseg checkpoint per network.
SEG_GDRIVE_ID="1CxLWBcByKFS-Vv75VG70DWUX3EcFmSu1"
SEG_ARCHIVE="seg_calib_ckpt.tar.gz"

fetch_seg() {
    mkdir -p "$CKPTS/segmentation/authors"
    echo "downloading $SEG_ARCHIVE (Google Drive id $SEG_GDRIVE_ID) into $CKPTS/segmentation/authors/"
    "$PYTHON" -m gdown "https://drive.google.com/uc?id=$SEG_GDRIVE_ID" -O "$CKPTS/segmentation/authors/$SEG_ARCHIVE"
    tar xzf "$CKPTS/segmentation/authors/$SEG_ARCHIVE" -C "$CKPTS/segmentation/authors"
    rm -f "$CKPTS/segmentation/authors/$SEG_ARCHIVE"
    echo "extracted checkpoints (link each to $CKPTS/segmentation/<model>.pth, <model> one of pspnet_r18"
    echo "deeplabv3_r18 fcn_r18 upernet_r18 pspnet_mv2 deeplabv3_mv2, for scripts/segmentation.sh):"
    find "$CKPTS/segmentation/authors" -type f \( -name '*.pth' -o -name '*.ckpt' -o -name '*.pt' \) | sort
}

fetch_imagenet() {
    ASI_CKPT_DIR="$CKPTS" "$PYTHON" - <<'PY'
from classification.backbones import MODELS, imagenet_weights_path, _download
for name, spec in MODELS.items():
    if not spec.weights_file:  # LLMs (Hugging Face cache), segmentation networks (`seg`), test miniatures: no file
        continue
    dst = imagenet_weights_path(name)
    if dst.is_file():
        print(f"{name}: {dst} already there")
        continue
    print(f"{name}: {spec.weights_url} -> {dst}")
    _download(spec.weights_url, dst)
PY
}

case "$WHAT" in
    setupB) fetch_setupB ;;
    imagenet) fetch_imagenet ;;
    seg) fetch_seg ;;
    all) fetch_imagenet; fetch_setupB ;;
    *) echo "usage: bash scripts/download_ckpts.sh [setupB|imagenet|seg|all]" >&2; exit 2 ;;
esac
