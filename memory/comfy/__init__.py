"""The only package that knows ComfyUI, and the differences between its versions: one file per concern,
so a ComfyUI change lands in one small file.

  host        what the running ComfyUI offers (feature detection, in one place) and its node API
  models      model patchers: names, sizes, facts for a plan, the pack's wrappers, unloading one
  budgets     Offload Model's budget on both patcher kinds: the bounded load, trimming, the cap
  dynamic     the thin calls into comfy-aimdo (dynamic VRAM): VBARs, watermarks, usage
  oom         what counts as out of memory on this host, and freeing after one
  use         CLIP and VAE copies whose every use is a stage (and which can move off after use)
  journal     the Memory Report's journal of the prompt that is running
  placement   Pick GPU: devices ComfyUI uses, placing MODEL/CLIP/VAE clones
  attention   ComfyUI's attention kernels, for Sliced Attention
  inpaint     Tiled Inpaint's backend: VAE, sampling and progress through ComfyUI
  gc          Force GC's view of ComfyUI's loaded models

ComfyUI is imported lazily inside functions, so the rest of the core stays importable (and
testable) without it; the core outside this package imports nothing of ComfyUI.
"""
