// Build of the ybyx viewer (issue 7). Pitfalls found in the trial (Cornerstone3D 5.14.0, Vite 8):
// - vtk.js pulls xmlbuilder2 whose ESM entry crashes the production bundle on load: alias it to
//   the prebuilt minified file;
// - the DICOM image loader starts its decode worker as an ES module: worker.format 'es';
// - the dev pre-bundler must leave the loader alone (its worker URL) but pre-bundle dicom-parser.
// Content-hashed assets under /viewer/assets/ are served immutable; gzip copies are written beside
// them (plugin below) so the server can send them precompressed (R-PF-1 first image fast).
import { defineConfig } from 'vite';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { readdirSync, readFileSync, writeFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

function precompress() {
  let outDir = 'dist';
  return {
    name: 'ybyx-precompress',
    apply: 'build',
    configResolved(config) {
      outDir = config.build.outDir;
    },
    closeBundle() {
      const walk = (dir) => {
        for (const name of readdirSync(dir)) {
          const path = join(dir, name);
          if (statSync(path).isDirectory()) walk(path);
          else if (/\.(js|wasm|css|html|json|svg)$/.test(name) && statSync(path).size > 1024) {
            writeFileSync(`${path}.gz`, gzipSync(readFileSync(path), { level: 9 }));
          }
        }
      };
      walk(outDir);
    },
  };
}

export default defineConfig({
  base: '/viewer/',
  resolve: {
    alias: {
      xmlbuilder2: fileURLToPath(
        new URL('./node_modules/xmlbuilder2/lib/xmlbuilder2.min.js', import.meta.url),
      ),
    },
  },
  worker: { format: 'es' },
  optimizeDeps: {
    exclude: ['@cornerstonejs/dicom-image-loader'],
    include: ['dicom-parser'],
  },
  build: {
    target: 'es2022',
    outDir: 'dist',
    emptyOutDir: true,
    assetsDir: 'assets',
    chunkSizeWarningLimit: 8000,
    sourcemap: false,
    modulePreload: { polyfill: false },
  },
  plugins: [precompress()],
});
