"""ComfyUI-Headroom: run big diffusion models on small GPUs.

Importing the pack changes nothing in ComfyUI: the node modules (and comfy_api) are only
imported when ComfyUI asks for the extension.
"""


async def comfy_entrypoint():
    from .nodes import HeadroomExtension
    return HeadroomExtension()
