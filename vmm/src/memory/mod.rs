//! Guest memory: where everything goes, the page tables that map it, and the
//! memfd-backed mappings that make restore and crash capture cheap.

pub mod layout;
pub mod mapping;
pub mod paging;
