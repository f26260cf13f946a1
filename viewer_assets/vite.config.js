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

// The main thread never decodes (the decode workers do) and never reads or writes VTK XML files,
// yet the loader's index imports its worker module and every codec's JavaScript, and vtk.js's
// XML reader pulls xmlbuilder2: about 1 MB of the main chunk parsed and evaluated before the first
// image (R-PF-1). In the main build only (worker bundles are built apart and keep the real
// modules), these imports resolve to small stubs that throw if ever called. Likewise vtk.js's WebGPU
// back-end, which Cornerstone does not use.
const MAIN_THREAD_STUBS = [
  {
    importer: /@cornerstonejs\/dicom-image-loader\/dist\/esm\/index\.js$/,
    source: './decodeImageFrameWorker.js',
    code: `const no = (name) => () => { throw new Error(name + ': decoding runs in the decode worker'); };
export const decodeImageFrame = no('decodeImageFrame');
export const postProcessDecodedPixels = no('postProcessDecodedPixels');`,
  },
  {
    importer: /@cornerstonejs\/dicom-image-loader\/dist\/esm\/index\.js$/,
    source: './shared/decoders/index.js',
    code: 'export const initializers = {};\nexport const decoders = {};',
  },
  {
    // vtk.js's rendering profiles register its WebGPU back-end too; Cornerstone renders with WebGL
    importer: /@kitware\/vtk\.js\/Rendering\/(Profiles\/[A-Za-z]+|Misc\/RenderingAPIs)\.js$/,
    source: /^\.\.\/WebGPU\//,
    code: '// vtk.js WebGPU back-end: not in the viewer (Cornerstone renders with WebGL)',
  },
  {
    importer: /@kitware\/vtk\.js\/IO\/XML\//,
    source: /(^xmlbuilder2$|\/xmlbuilder2\/lib\/xmlbuilder2\.min\.js$)/, // (after the alias above)
    code: `export function create() { throw new Error('xmlbuilder2 is not in the viewer (no VTK XML files)'); }`,
  },
];

// vtk.js checks, at the first 16-bit texture, whether the GPU filters norm16 textures linearly by
// creating one more WebGL context and drawing into it (vtk.js Texture/supportsNorm16Linear.js):
// ~100 ms in software WebGL, in the middle of the first image's render. Cornerstone's init has
// just made the same check (R16_SNORM, LINEAR, read back: its rendering capability
// `norm16Linear`); src/main.js hands that answer over as globalThis.__ybyxNorm16Linear and vtk.js
// uses it instead of probing again (R-PF-1). Without an answer vtk.js probes as before.
function reuseNorm16Probe() {
  const from = 'if (supportsNorm16LinearCache === void 0) supportsNorm16LinearCache = supportsNorm16Linear();';
  const to =
    'if (supportsNorm16LinearCache === void 0) supportsNorm16LinearCache = ' +
    "typeof globalThis.__ybyxNorm16Linear === 'boolean' ? globalThis.__ybyxNorm16Linear : supportsNorm16Linear();";
  return {
    name: 'ybyx-reuse-norm16-probe',
    transform(code, id) {
      if (!id.endsWith('/@kitware/vtk.js/Rendering/OpenGL/Texture/supportsNorm16Linear.js')) return null;
      if (!code.includes(from)) this.error(`${id}: vtk.js changed, review reuseNorm16Probe in vite.config.js`);
      return code.replace(from, to);
    },
  };
}

function mainThreadStubs() {
  const PREFIX = '\0ybyx-stub:';
  return {
    name: 'ybyx-main-thread-stubs',
    apply: 'build',
    enforce: 'pre',
    resolveId(source, importer) {
      const i = MAIN_THREAD_STUBS.findIndex(
        (s) => importer && s.importer.test(importer) && (s.source instanceof RegExp ? s.source.test(source) : s.source === source),
      );
      return i >= 0 ? `${PREFIX}${i}` : null;
    },
    load(id) {
      return id.startsWith(PREFIX) ? MAIN_THREAD_STUBS[Number(id.slice(PREFIX.length))].code : null;
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
  plugins: [mainThreadStubs(), reuseNorm16Probe(), precompress()],
});
