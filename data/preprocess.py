"""Device-side, batched preprocessing: uint8 NHWC → resized, normalised float NCHW."""

import paddle
import paddle.nn.functional as F

# The statistics PPIM's ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DevicePreprocess(paddle.nn.Layer):
    """Resize (bicubic) and ImageNet-normalise a uint8 ``[B, H, W, 3]`` batch where it lives.

    The host only ships the small uint8 images; the 384×384 float tensors are made
    on the accelerator. Paddle's bicubic kernel (a = -0.75) overshoots at edges
    (values far outside [0, 1] on 32 -> 384 upsampling); the result is clamped to
    [0, 1] as PIL's uint8 resize (a = -0.5), which the ImageNet weights saw, is.
    """

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", paddle.to_tensor(IMAGENET_MEAN).reshape([1, 3, 1, 1]))
        self.register_buffer("std", paddle.to_tensor(IMAGENET_STD).reshape([1, 3, 1, 1]))

    def forward(self, images: paddle.Tensor) -> paddle.Tensor:
        x = images.astype("float32").transpose([0, 3, 1, 2]) / 255.0
        if x.shape[-2:] != [self.image_size, self.image_size]:
            x = F.interpolate(x, size=[self.image_size, self.image_size],
                              mode="bicubic", align_corners=False).clip(0.0, 1.0)
        return (x - self.mean) / self.std
