"""Every registered method with settings small enough for the 2-block test backbones."""

TINY_METHOD_PARAMS = {
    "dpmm": dict(n_components=8, epochs=2, batch_images=4),
    "dpmm-likelihood": dict(n_components=8, epochs=2, batch_images=4),
    "anomalydino": {},
    "anomalydino-1shot": {},
    "patchcore-30": {},
    "himatch": dict(layers=(1, 2), clusters=4, retrieve_k=2),
    "dpmm-multistage": dict(layers=(1, 2), n_components=8, epochs=2, batch_images=4),
}
