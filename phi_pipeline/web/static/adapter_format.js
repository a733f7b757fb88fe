// A reader of onnxruntime's `.onnx_adapter` files (flatbuffers, onnxruntime/lora/adapter_format/adapter_schema.fbs):
// onnxruntime-web has none (onnxruntime issue #26726). Tables are read by their vtable slots, as flatc's
// generated code does:
//   table Adapter   { format_version:int; adapter_version:int; model_version:int; parameters:[Parameter]; }
//   table Parameter { name:string; dims:[int64]; data_type:TensorDataType; raw_data:[uint8] (force_align: 8); }
import { ByteBuffer } from 'flatbuffers';

const IDENTIFIER = 'TORT';
const FORMAT_VERSION = 1;  // the only one onnxruntime accepts
// TensorDataType -> [onnxruntime-web tensor type, typed array over raw_data]
const DATA_TYPES = {
  1: ['float32', Float32Array], 2: ['uint8', Uint8Array], 3: ['int8', Int8Array], 6: ['int32', Int32Array],
  7: ['int64', BigInt64Array], 10: ['float16', Uint16Array], 16: ['bfloat16', Uint16Array],
};

export class AdapterFormatError extends Error {}

// {formatVersion, adapterVersion, modelVersion, parameters: Map(name -> {type, dims, data})}
export function readAdapter(bytes) {
  const bb = new ByteBuffer(bytes);
  if (bytes.length < 8 || !bb.__has_identifier(IDENTIFIER)) {
    throw new AdapterFormatError(`not an .onnx_adapter file (no '${IDENTIFIER}' identifier)`);
  }
  const slot = (table, index) => bb.__offset(table, 4 + 2 * index);  // 0 when the field is absent
  const int32 = (table, index) => { const o = slot(table, index); return o ? bb.readInt32(table + o) : 0; };
  const root = bb.readInt32(bb.position()) + bb.position();
  const formatVersion = int32(root, 0);
  if (formatVersion !== FORMAT_VERSION) {
    throw new AdapterFormatError(`adapter format version ${formatVersion}; this reader (and onnxruntime) reads ${FORMAT_VERSION}`);
  }
  const parameters = new Map();
  const list = slot(root, 3);
  const count = list ? bb.__vector_len(root + list) : 0;
  for (let i = 0; i < count; i++) {
    const p = bb.__indirect(bb.__vector(root + list) + 4 * i);
    const name = bb.__string(p + slot(p, 0));
    const dimsAt = slot(p, 1);
    const dims = [];
    for (let j = 0; dimsAt && j < bb.__vector_len(p + dimsAt); j++) dims.push(Number(bb.readInt64(bb.__vector(p + dimsAt) + 8 * j)));
    const dataType = int32(p, 2);
    if (!(dataType in DATA_TYPES)) throw new AdapterFormatError(`${name}: tensor data type ${dataType} is not supported here`);
    const [type, TypedArray] = DATA_TYPES[dataType];
    const rawAt = slot(p, 3);
    const start = rawAt ? bb.__vector(p + rawAt) : 0;
    const length = rawAt ? bb.__vector_len(p + rawAt) : 0;
    const elements = dims.reduce((a, b) => a * b, 1);
    if (length !== elements * TypedArray.BYTES_PER_ELEMENT) {
      throw new AdapterFormatError(`${name}: ${length} bytes of data for dims [${dims}] of ${type}`);
    }
    // copied into a buffer of its own: the typed array needs its element alignment, the tensor outlives the file
    const data = new TypedArray(bytes.slice(start, start + length).buffer);
    parameters.set(name, { type, dims, data });
  }
  return { formatVersion, adapterVersion: int32(root, 1), modelVersion: int32(root, 2), parameters };
}
