//! Hostile plugin components written in WebAssembly text and made into
//! components here (wit-component), for the memory-bound tests: what no SDK
//! would produce, a guest that breaks the host's assumptions on purpose.

use std::path::{Path, PathBuf};

/// A contract 0.1 component whose every result is `outputs` output records,
/// each a value of `value_mib` MiB pointing at the same guest bytes (offset
/// 0): few guest bytes, `outputs × value_mib` MiB if the host copied them all.
pub fn aliasing_v01(outputs: u32, value_mib: u32) -> String {
    let value_bytes = value_mib << 20;
    // Results table at 128 (12 bytes each), output records at 1 MiB (64
    // bytes each, all zero but the value's length), allocations from 16 MiB.
    format!(
        r#"(module
  (memory (export "memory") {pages})
  {realloc}
  (func (export "sluice:transform/transform@0.1.0#init") (param i32 i32) (result i32)
    (i32.store8 (i32.const 64) (i32.const 0))
    (i32.const 64))
  (func (export "sluice:transform/transform@0.1.0#process-batch") (param $ptr i32) (param $len i32) (result i32)
    (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.const {outputs})))
      (i32.store (i32.add (i32.const 0x100010) (i32.mul (local.get $i) (i32.const 64))) (i32.const {value_bytes}))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.set $i (i32.const 0))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
      (i32.store8 (i32.add (i32.const 128) (i32.mul (local.get $i) (i32.const 12))) (i32.const 0))
      (i32.store (i32.add (i32.const 132) (i32.mul (local.get $i) (i32.const 12))) (i32.const 0x100000))
      (i32.store (i32.add (i32.const 136) (i32.mul (local.get $i) (i32.const 12))) (i32.const {outputs}))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (i32.store (i32.const 96) (i32.const 128))
    (i32.store (i32.const 100) (local.get $len))
    (i32.const 96)))"#,
        pages = (value_bytes >> 16).max(256) + 256,
        realloc = REALLOC,
    )
}

/// A contract 0.1 component with a second linear memory: every batch grows
/// both memories by `mib` MiB each, and traps if either cannot grow.
pub fn two_memories_v01(mib: u32) -> String {
    let pages = mib << 4;
    format!(
        r#"(module
  (memory (export "memory") 512)
  (memory $second 1)
  {realloc}
  (func (export "sluice:transform/transform@0.1.0#init") (param i32 i32) (result i32)
    (i32.store8 (i32.const 64) (i32.const 0))
    (i32.const 64))
  (func (export "sluice:transform/transform@0.1.0#process-batch") (param $ptr i32) (param $len i32) (result i32)
    (if (i32.lt_s (memory.grow 0 (i32.const {pages})) (i32.const 0)) (then unreachable))
    (if (i32.lt_s (memory.grow $second (i32.const {pages})) (i32.const 0)) (then unreachable))
    unreachable))"#,
        realloc = REALLOC,
    )
}

/// A bump allocator from 16 MiB, growing the memory when it must.
const REALLOC: &str = r#"(global $heap (mut i32) (i32.const 0x1000000))
  (func (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                            (i32.sub (i32.const 0) (local.get $align))))
    (global.set $heap (i32.add (local.get $at) (local.get $size)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size 0) (i32.const 65536)))
      (then (drop (memory.grow 0 (i32.add (i32.shr_u (i32.sub (global.get $heap) (i32.mul (memory.size 0) (i32.const 65536))) (i32.const 16)) (i32.const 1))))))
    (local.get $at))"#;

/// The component of contract 0.1 (`wit/0.1`) made from the core module
/// `wat`, written to `dir/name.wasm`.
pub fn component_v01(dir: &Path, name: &str, wat: &str) -> PathBuf {
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(super::root().join("wit/0.1")).expect("wit/0.1 parses");
    let world = resolve.select_world(&[package], Some("transformer")).expect("the transformer world");
    let mut module = wat::parse_str(wat).expect("the hostile module parses");
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8)
        .expect("metadata embeds");
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("the module is a core module")
        .validate(true)
        .encode()
        .expect("the component encodes");
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, component).expect("component written");
    path
}
