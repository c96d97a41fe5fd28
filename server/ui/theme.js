// Runs before the first paint (a classic script): the theme picked with the toggle, if any;
// otherwise the system's (prefers-color-scheme, in style.css).
try {
  const theme = localStorage.getItem("ggserve.theme");
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
} catch {
  // storage off: follow the system
}
