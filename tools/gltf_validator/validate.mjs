// Validate a glTF/GLB file with the Khronos glTF validator and print its JSON report.
// Usage: node validate.mjs FILE.glb   (exit 0 when the report has no errors, 1 otherwise, 2 on bad usage)
// Install once: npm install --prefix tools/gltf_validator
import { readFile } from "node:fs/promises";
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
let validator;
try {
  validator = require("gltf-validator");
} catch {
  console.error("gltf-validator is not installed: run 'npm install --prefix tools/gltf_validator'");
  process.exit(2);
}

const file = process.argv[2];
if (!file) {
  console.error("usage: node validate.mjs FILE.glb");
  process.exit(2);
}
const bytes = new Uint8Array(await readFile(file));
const report = await validator.validateBytes(bytes, {
  uri: path.basename(file),
  maxIssues: 0, // all of them
  externalResourceFunction: async (uri) =>
    new Uint8Array(await readFile(path.resolve(path.dirname(file), decodeURIComponent(uri)))),
});
console.log(JSON.stringify(report, null, 2));
process.exit(report.issues.numErrors > 0 ? 1 : 0);
