"""The pack's nodes (V3 schema). Each module is a thin translation from node inputs to core calls."""
from ..memory.comfy.host import node_api
from .force_gc import ForceGC
from .memory_report import MemoryReportNode
from .offload_model import OffloadModel
from .pick_gpu import PickGPU
from .sliced_attention import SlicedAttention
from .tiled_inpaint import TiledInpaint

ComfyExtension, _, _ = node_api()

NODES = [OffloadModel, SlicedAttention, PickGPU, TiledInpaint, ForceGC, MemoryReportNode]


class HeadroomExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)
