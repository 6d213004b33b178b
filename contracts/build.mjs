// Compiles contracts/src/*.sol with the pinned solc-js (its JS API, standard JSON) and
// writes contracts/out/<Contract>.json: abi, bytecode, deployedBytecode, the compiler
// version and the sha256 of the source. Output is deterministic (sorted keys, fixed
// settings, no metadata hash), so check.sh can diff it against the committed copy.
import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const root = dirname(fileURLToPath(import.meta.url));
const srcDir = join(root, "src");
const outDir = join(root, "out");

const files = readdirSync(srcDir).filter((f) => f.endsWith(".sol")).sort();
const sources = {};
for (const f of files) {
  sources[`src/${f}`] = { content: readFileSync(join(srcDir, f), "utf8") };
}

const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    metadata: { bytecodeHash: "none", appendCBOR: false },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};

const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
for (const e of output.errors || []) {
  process.stderr.write(`${e.formattedMessage || e.message}\n`);
}
if (errors.length > 0) {
  process.stderr.write(`build.mjs: ${errors.length} compile error(s); no artifacts written\n`);
  process.exit(1);
}

mkdirSync(outDir, { recursive: true });
const version = solc.version();
for (const [path, contracts] of Object.entries(output.contracts).sort()) {
  const sourceSha256 = createHash("sha256").update(sources[path].content).digest("hex");
  for (const [name, c] of Object.entries(contracts).sort()) {
    // Interfaces have no bytecode and need no artifact.
    if (!c.evm.bytecode.object) continue;
    const artifact = {
      contractName: name,
      sourceName: path,
      compiler: { name: "solc-js", version },
      sourceSha256,
      abi: c.abi,
      bytecode: `0x${c.evm.bytecode.object}`,
      deployedBytecode: `0x${c.evm.deployedBytecode.object}`,
    };
    writeFileSync(join(outDir, `${name}.json`), `${JSON.stringify(artifact, null, 2)}\n`);
    process.stdout.write(`wrote out/${name}.json (${c.evm.deployedBytecode.object.length / 2} bytes deployed)\n`);
  }
}
