from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    LAYOUT_NHWC: _ClassVar[Layout]
    LAYOUT_NTHWC: _ClassVar[Layout]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
LAYOUT_UNSPECIFIED: Layout
LAYOUT_NHWC: Layout
LAYOUT_NTHWC: Layout
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType

class ImageBatch(_message.Message):
    __slots__ = ("data", "shape", "layout")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    layout: Layout
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[Layout, str]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "images", "latents", "prompts", "item_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: ImageBatch
    latents: Tensor
    prompts: _containers.RepeatedScalarFieldContainer[str]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Union[ImageBatch, _Mapping]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., prompts: _Optional[_Iterable[str]] = ..., item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class ItemStatus(_message.Message):
    __slots__ = ("item_id", "ok", "error")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    ok: bool
    error: str
    def __init__(self, item_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "scorer", "scorer_version", "heads", "extras", "items")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    SCORER_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    scorer: str
    scorer_version: str
    heads: _containers.RepeatedCompositeFieldContainer[Scores]
    extras: _containers.RepeatedCompositeFieldContainer[Scores]
    items: _containers.RepeatedCompositeFieldContainer[ItemStatus]
    def __init__(self, request_id: _Optional[str] = ..., scorer: _Optional[str] = ..., scorer_version: _Optional[str] = ..., heads: _Optional[_Iterable[_Union[Scores, _Mapping]]] = ..., extras: _Optional[_Iterable[_Union[Scores, _Mapping]]] = ..., items: _Optional[_Iterable[_Union[ItemStatus, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("name", "version", "heads", "input_size", "max_batch", "accepts_video", "max_request_bytes", "reads_latents")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_VIDEO_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    READS_LATENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    heads: _containers.RepeatedScalarFieldContainer[str]
    input_size: int
    max_batch: int
    accepts_video: bool
    max_request_bytes: int
    reads_latents: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., heads: _Optional[_Iterable[str]] = ..., input_size: _Optional[int] = ..., max_batch: _Optional[int] = ..., accepts_video: _Optional[bool] = ..., max_request_bytes: _Optional[int] = ..., reads_latents: _Optional[bool] = ...) -> None: ...
