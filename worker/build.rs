include!("engine/link_torch.rs");

fn main() {
    link_torch();
}
