// Run the ORIGINAL @vladmandic/face-api 1.7.15 face recognizer on raw crops and print descriptors.
//
// Why: robustcnn's torch port is checked against descriptors computed by the JS code itself
// (tests/fixtures/face_api_reference.json). tools/make_face_fixture.py sets up node_modules and calls:
//
//   node describe.js <face-api package dir> <crops.u8> <shapes.json> <out.json>
//
// crops.u8 holds uint8 RGB crops one after the other (row-major, HWC); shapes.json lists their
// [height, width]. 150x150 crops go straight to the net; others are padded to a square and resized by
// face-api itself (what robustcnn's to_face_input reproduces).
// The backend is tfjs's pure-JS 'cpu' (deterministic float32, no native or wasm kernels involved).
'use strict';

const fs = require('fs');
const path = require('path');

async function main() {
  const [packageDir, cropsFile, shapesFile, outFile] = process.argv.slice(2);
  if (!outFile) {
    console.error('usage: node describe.js <face-api package dir> <crops.u8> <shapes.json> <out.json>');
    process.exit(2);
  }
  const faceapi = require('@vladmandic/face-api/dist/face-api.node-wasm.js');
  const { tf } = faceapi;
  await tf.setBackend('cpu');
  await tf.ready();
  await faceapi.nets.faceRecognitionNet.loadFromDisk(path.join(packageDir, 'model'));

  const shapes = JSON.parse(fs.readFileSync(shapesFile, 'utf8'));
  const count = shapes.length;
  const bytes = fs.readFileSync(cropsFile);
  const total = shapes.reduce((sum, [h, w]) => sum + h * w * 3, 0);
  if (bytes.length !== total) {
    throw new Error(`${cropsFile} has ${bytes.length} bytes, the shapes describe ${total}`);
  }
  const descriptors = [];
  const started = Date.now();
  let offset = 0;
  for (let i = 0; i < count; i += 1) {
    const [h, w] = shapes[i];
    const crop = Int32Array.from(bytes.subarray(offset, offset + h * w * 3));
    offset += h * w * 3;
    const input = tf.tensor3d(crop, [h, w, 3], 'int32');
    const descriptor = await faceapi.nets.faceRecognitionNet.computeFaceDescriptor(input);
    input.dispose();
    descriptors.push(Array.from(descriptor));
  }
  const result = {
    face_api_version: faceapi.version,
    tfjs_version: tf.version_core,
    backend: tf.getBackend(),
    seconds_per_crop: (Date.now() - started) / 1000 / Math.max(count, 1),
    descriptors,
  };
  fs.writeFileSync(outFile, JSON.stringify(result));
  console.log(`${count} descriptors (${result.seconds_per_crop.toFixed(3)} s/crop, backend ${result.backend})`);
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
