export async function setupTools() {}
export function attachViewports() {}
export async function openComparison() {}
