//! The policy's place under the socklens bpffs root, and plain C values to and
//! from map bytes: what `state` and `svcmaps` both write with.

use plain::Plain;

use crate::attach::cgroup_attach::Pins;

pub const COMPONENT: &str = crate::attach::cgroup_attach::POLICY;

pub fn pins() -> Pins {
    Pins::new(COMPONENT)
}

/// The bytes of a plain C value for a map update.
pub fn bytes<T: Plain>(v: &T) -> &[u8] {
    // SAFETY: the skeleton's types are C structs of integers and byte arrays
    // without implicit padding (policy.h lays them out so), any byte is valid.
    unsafe { plain::as_bytes(v) }
}

pub fn decode<T: Plain + Default>(b: &[u8]) -> Option<T> {
    let mut v = T::default();
    plain::copy_from_bytes(&mut v, b).ok()?;
    Some(v)
}
