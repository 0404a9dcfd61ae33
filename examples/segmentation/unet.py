"""A small U-Net (Keras 3 functional API) and the Dice measures it trains and is judged with.

Input and output are (H, W), as the scan and mask files are, so the batches the server sends
feed `fit` as they are; the channel axis the convolutions need is added and removed inside.
"""

from __future__ import annotations

import keras
from keras import layers, ops

SMOOTH = 1.0


def dice(y_true, y_pred):
    """Soft Dice over the whole batch: 2|A.B| / (|A| + |B|). Summed over the batch rather than
    averaged per scan, so a scan with a tiny mask does not dominate; SMOOTH keeps it defined
    when both are empty."""
    y_true = ops.cast(y_true, y_pred.dtype)
    overlap = ops.sum(y_true * y_pred)
    return (2.0 * overlap + SMOOTH) / (ops.sum(y_true) + ops.sum(y_pred) + SMOOTH)


def bce_dice_loss(y_true, y_pred):
    """BCE gives every pixel a gradient from the start; Dice keeps the rare foreground from being
    drowned out by the background, which is about 92% of the pixels here."""
    y_true = ops.cast(y_true, y_pred.dtype)
    bce = ops.mean(keras.losses.binary_crossentropy(y_true[..., None], y_pred[..., None]))
    return bce + (1.0 - dice(y_true, y_pred))


def _conv_block(x, filters: int):
    for _ in range(2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
    return x


def build_unet(size: int, base_filters: int = 8, depth: int = 3) -> keras.Model:
    """`depth` times (conv block, 2x2 pool) down, a bottleneck, and back up with transposed
    convolutions, each level concatenated with the encoder's output at the same resolution (the
    skip connections that give the U-Net its sharp edges)."""
    if size % 2 ** depth:
        raise ValueError(f"--size {size} must be divisible by {2 ** depth} for a U-Net of depth {depth}")
    inputs = keras.Input((size, size), name="scan")
    x = layers.Reshape((size, size, 1))(inputs)
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2 ** level)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = _conv_block(x, base_filters * 2 ** depth)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base_filters * 2 ** level, 2, strides=2, padding="same")(x)
        x = _conv_block(layers.Concatenate()([x, skips[level]]), base_filters * 2 ** level)
    x = layers.Conv2D(1, 1, activation="sigmoid")(x)
    outputs = layers.Reshape((size, size), name="mask")(x)
    model = keras.Model(inputs, outputs, name="unet")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=bce_dice_loss, metrics=[dice])
    return model
